"""Reference InternVL image and video preprocessing, as in the model cards (InternVL2/2.5 README).

`find_closest_aspect_ratio`, `dynamic_preprocess`, `load_image`, `get_index` and `load_video`
follow the cards' code line for line. `build_transform` replaces torchvision (not installed here) with PIL +
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


# Video, as in the cards' video example (decord reads the file; each frame is one tile there: max_num=1).
def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array([
        int(start_idx + (seg_size / 2) + np.round(seg_size * idx))
        for idx in range(num_segments)
    ])
    return frame_indices


def load_video(video_path, bound=None, input_size=448, max_num=1, num_segments=32):
    from decord import VideoReader, cpu
    vr = VideoReader(video_path, ctx=cpu(0), num_threads=1)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())

    pixel_values_list, num_patches_list = [], []
    transform = build_transform(input_size=input_size)
    frame_indices = get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    for frame_index in frame_indices:
        img = Image.fromarray(vr[frame_index].asnumpy()).convert('RGB')
        img = dynamic_preprocess(img, image_size=input_size, use_thumbnail=True, max_num=max_num)
        pixel_values = [transform(tile) for tile in img]
        pixel_values = torch.stack(pixel_values)
        num_patches_list.append(pixel_values.shape[0])
        pixel_values_list.append(pixel_values)
    pixel_values = torch.cat(pixel_values_list)
    return pixel_values, num_patches_list
