"""The vision pool: embeddings equal transformers', batching returns each caller its own rows, bad tiles refused."""
import asyncio

import grpc
import pytest
import torch

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.checkpoint import read_model_config
from services.common.tensors import from_proto, to_proto
from services.vision_encoder.encoder import TileBatcher, load_vision_model
from services.vision_encoder.intern_vit import pixel_shuffle
from tests.conftest import noise_image
from tests.reference_preprocess import reference_pixel_values
from services.gateway.tiling import tile_image


@pytest.fixture(scope="module")
def vision(tiny_checkpoint):
    cfg = read_model_config(tiny_checkpoint)
    return cfg, load_vision_model(cfg, tiny_checkpoint, "cpu", torch.float32)


def test_embeddings_equal_transformers(vision, reference):
    cfg, model = vision
    image = noise_image(800, 600, seed=5)
    tiles = torch.from_numpy(tile_image(image, max_num=6))
    with torch.no_grad():
        expected = reference.model.model.get_image_features(
            pixel_values=reference_pixel_values(image, max_num=6), vision_feature_layer=-1,
            vision_feature_select_strategy="default").pooler_output
    assert torch.allclose(model(tiles), expected.reshape(-1, cfg.text.hidden_size), atol=1e-5, rtol=0)


def test_pixel_shuffle_v1_is_v2_transposed():
    x = torch.randn(2, 8, 8, 3)
    v1, v2 = pixel_shuffle(x, 0.5, "v1"), pixel_shuffle(x, 0.5, "v2")
    assert torch.equal(v1.reshape(2, 4, 4, 12).transpose(1, 2), v2.reshape(2, 4, 4, 12))
    # v2 token (i, j) holds the 2x2 block at rows 2i..2i+1, columns 2j..2j+1.
    assert torch.equal(v2.reshape(2, 4, 4, 12)[:, 1, 2], torch.cat([x[:, 2, 4], x[:, 2, 5], x[:, 3, 4], x[:, 3, 5]], -1))


def test_concurrent_calls_get_their_own_rows(vision):
    cfg, model = vision
    images = [torch.randint(0, 256, (n, 448, 448, 3), dtype=torch.uint8) for n in (3, 1, 5, 2)]
    alone = [model(img) for img in images]

    async def batched():
        batcher = TileBatcher(model, "cpu", max_batch_tiles=6, max_wait_s=0.05)
        batcher.start()
        return await asyncio.gather(batcher.encode(images[:2]), batcher.encode(images[2:3]),
                                    batcher.encode(images[3:]))

    results = [e for call in asyncio.run(batched()) for e in call]
    for got, want in zip(results, alone):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def encoder_stub(stack):
    with grpc.insecure_channel(stack.vision_addr) as channel:
        yield pb_grpc.VisionEncoderStub(channel)


@pytest.mark.parametrize("tiles", [
    pb.Tensor(dtype="float32", shape=[1, 448, 448, 3], data=bytes(448 * 448 * 3 * 4)),
    pb.Tensor(dtype="uint8", shape=[1, 224, 224, 3], data=bytes(224 * 224 * 3)),
    pb.Tensor(dtype="uint8", shape=[1, 448, 448, 3], data=b"short"),
    pb.Tensor(dtype="uint8", shape=[0, 448, 448, 3], data=b""),
])
def test_bad_tiles_are_invalid_argument(encoder_stub, tiles):
    with pytest.raises(grpc.RpcError) as e:
        encoder_stub.Encode(pb.EncodeRequest(images=[pb.ImageTiles(tiles=tiles)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_encode_over_grpc_returns_raw_embeddings(encoder_stub, vision):
    cfg, model = vision
    tiles = torch.randint(0, 256, (2, 448, 448, 3), dtype=torch.uint8)
    response = encoder_stub.Encode(pb.EncodeRequest(images=[pb.ImageTiles(tiles=to_proto(tiles))]))
    got = from_proto(response.images[0].embeddings)
    assert got.shape == (2 * cfg.tokens_per_tile, cfg.text.hidden_size)
    assert torch.allclose(got, model(tiles), atol=1e-5, rtol=0)
    info = encoder_stub.Info(pb.InfoRequest())
    assert (info.tokens_per_tile, info.hidden_size) == (256, cfg.text.hidden_size)


def test_jobs_of_callers_that_left_are_not_encoded():
    seen = []

    def model(tiles):  # stands in for the tower: records the batch, one row per tile
        seen.append(tiles.shape[0])
        return torch.zeros(tiles.shape[0], 4)

    async def scenario():
        batcher = TileBatcher(model, "cpu", max_batch_tiles=8, max_wait_s=0.01)
        gone = asyncio.create_task(batcher.encode([torch.zeros(3, 448, 448, 3, dtype=torch.uint8)]))
        await asyncio.sleep(0)  # queued, the worker not started yet
        gone.cancel()
        batcher.start()
        out = await batcher.encode([torch.zeros(2, 448, 448, 3, dtype=torch.uint8)])
        return out

    out = asyncio.run(scenario())
    assert seen == [2] and out[0].shape == (2, 4)
