"""Reference InternVL image preprocessing, as in the model cards (InternVL2/2.5 README).

`find_closest_aspect_ratio`, `dynamic_preprocess` and `load_image` follow the cards' code
line for line. `build_transform` replaces torchvision (not installed here) with PIL +
numpy + torch doing the same operations:
  T.Lambda(convert RGB)  -> img.convert('RGB') if img.mode != 'RGB'
  T.Resize((s, s), BICUBIC) on a PIL image -> img.resize((s, s), Image.BICUBIC)
  T.ToTensor()           -> uint8 HWC -> float32 CHW / 255
  T.Normalize(mean, std) -> (x - mean) / std in float32
Tests use this as ground truth for services/gateway/tiling.py and the pixel_values the
vision encoder receives.
"""
import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_transform(input_size):
    MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)

    def transform(img):
        img = img.convert('RGB') if img.mode != 'RGB' else img
        img = img.resize((input_size, input_size), Image.BICUBIC)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        return (x - mean) / std

    return transform


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    # calculate the existing image aspect ratio
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])

    # find the closest aspect ratio to the target
    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    # calculate the target width and height
    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    # resize the image
    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        # split the image
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def load_image(image_file, input_size=448, max_num=12):
    """As in the cards; also accepts an already opened PIL image."""
    image = image_file if isinstance(image_file, Image.Image) else Image.open(image_file)
    image = image.convert('RGB')
    transform = build_transform(input_size=input_size)
    images = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    pixel_values = [transform(image) for image in images]
    pixel_values = torch.stack(pixel_values)
    return pixel_values


def reference_pixel_values(image: Image.Image, max_num: int = 12) -> torch.Tensor:
    """Normalised float32 pixel_values [n_tiles, 3, 448, 448] for `image`, per the cards."""
    return load_image(image, input_size=448, max_num=max_num)


def reference_tiles(image: Image.Image, max_num: int = 12, min_num: int = 1) -> np.ndarray:
    """The cards' tiles before normalisation, as uint8 [n_tiles, 448, 448, 3]."""
    tiles = dynamic_preprocess(image.convert('RGB'), min_num=min_num, max_num=max_num,
                               image_size=448, use_thumbnail=True)
    return np.stack([np.asarray(tile) for tile in tiles])
