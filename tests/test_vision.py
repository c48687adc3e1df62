"""The vision pool: embeddings equal transformers', batching returns each caller its own rows, bad tiles refused."""
import asyncio
import threading
from collections import deque

import grpc
import pytest
import torch
import torch._dynamo.testing

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.checkpoint import read_model_config
from services.common.tensors import from_proto, to_proto
from services.vision_encoder.encoder import TileBatcher, VisionRunner, load_vision_model
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
    # fp32 summation order (oneDNN picks kernels by CPU): 1.25e-5 off at values near 13.6 on an AVX-512 EPYC
    assert torch.allclose(model(tiles), expected.reshape(-1, cfg.text.hidden_size), atol=1e-5, rtol=1e-5)


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
        batcher = TileBatcher(VisionRunner(model, "cpu", max_batch_tiles=6), max_wait_s=0.05)
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
        batcher = TileBatcher(VisionRunner(model, "cpu", max_batch_tiles=8), max_wait_s=0.01)
        gone = asyncio.create_task(batcher.encode([torch.zeros(3, 448, 448, 3, dtype=torch.uint8)]))
        await asyncio.sleep(0)  # queued, the worker not started yet
        gone.cancel()
        batcher.start()
        out = await batcher.encode([torch.zeros(2, 448, 448, 3, dtype=torch.uint8)])
        return out

    out = asyncio.run(scenario())
    assert seen == [2] and out[0].shape == (2, 4)


class GatedRunner:
    """Stands in for VisionRunner: records launches; each batch's result waits until the test releases it."""

    max_batch_tiles = 2

    def __init__(self):
        self.launched: list[int] = []
        self.release: dict[int, threading.Event] = {}

    def launch(self, images):
        n = sum(img.shape[0] for img in images)
        if n == 3:
            raise RuntimeError("launch failed")
        index = len(self.launched)
        self.launched.append(n)
        gate = self.release.setdefault(index, threading.Event())

        def result():
            gate.wait(5)
            if n == 1 and images[0][0, 0, 0, 0] == 7:
                raise RuntimeError("result failed")
            return [img.reshape(img.shape[0], -1)[:, :4].float() for img in images]
        return result


def test_two_batches_in_flight_and_failures_stay_with_their_batch():
    runner = GatedRunner()
    tiles = [torch.full((n, 448, 448, 3), v, dtype=torch.uint8) for n, v in ((2, 1), (2, 2), (2, 3), (1, 7))]

    async def scenario():
        batcher = TileBatcher(runner, max_wait_s=0)
        batcher.start()
        calls = [asyncio.create_task(batcher.encode([t])) for t in tiles[:3]]
        for _ in range(50):
            await asyncio.sleep(0.01)
        launched_while_blocked = list(runner.launched)  # two batches launched, the third waits for a slot
        runner.release.setdefault(0, threading.Event()).set()
        first = await calls[0]
        runner.release.setdefault(1, threading.Event()).set()
        runner.release.setdefault(2, threading.Event()).set()
        await asyncio.gather(*calls[1:])
        too_big = asyncio.create_task(batcher.encode([torch.zeros(3, 448, 448, 3, dtype=torch.uint8)]))
        with pytest.raises(RuntimeError, match="launch failed"):  # one image larger than a batch: runner's call
            await too_big
        runner.release.setdefault(3, threading.Event()).set()
        with pytest.raises(RuntimeError, match="result failed"):
            await batcher.encode([tiles[3]])
        runner.release.setdefault(4, threading.Event()).set()
        after = await batcher.encode([tiles[0][:1]])  # the worker still serves
        return launched_while_blocked, first, [c.result() for c in calls], after

    launched_while_blocked, first, results, after = asyncio.run(scenario())
    assert launched_while_blocked == [2, 2]
    for (out,), t in zip(results, tiles):
        assert torch.equal(out, t.reshape(t.shape[0], -1)[:, :4].float())
    assert torch.equal(after[0], torch.ones(1, 4))


def test_only_a_busy_device_makes_a_batch_wait_for_more_tiles():
    """The wait for more tiles (VISION_MAX_WAIT_MS, 1 s here) applies while another batch runs, when this one would
    wait for the device anyway: a lone call on an idle device is launched at once; calls arriving while a batch runs
    are gathered into one."""
    runner = GatedRunner()
    runner.max_batch_tiles = 8
    tiles = [torch.full((1, 448, 448, 3), v, dtype=torch.uint8) for v in (1, 2, 4)]

    async def scenario():
        loop = asyncio.get_running_loop()
        batcher = TileBatcher(runner, max_wait_s=1.0)
        batcher.start()
        start = loop.time()
        calls = [asyncio.create_task(batcher.encode([tiles[0]]))]
        while not runner.launched:
            await asyncio.sleep(0.005)
        idle_wait = loop.time() - start
        calls.append(asyncio.create_task(batcher.encode([tiles[1]])))  # while the first batch runs
        await asyncio.sleep(0.1)
        calls.append(asyncio.create_task(batcher.encode([tiles[2]])))
        while len(runner.launched) < 2:
            await asyncio.sleep(0.005)
        for event in (runner.release.setdefault(i, threading.Event()) for i in (0, 1)):
            event.set()
        return idle_wait, [(await c)[0] for c in calls]

    idle_wait, results = asyncio.run(scenario())
    assert idle_wait < 0.5 and runner.launched == [1, 2]
    for out, t in zip(results, tiles):
        assert torch.equal(out, t.reshape(1, -1)[:, :4].float())


def compiles_whole(model):
    tiles = torch.randint(0, 256, (3, 448, 448, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = VisionRunner(model, "cpu", max_batch_tiles=2, compile=counter)
    (eager,) = VisionRunner(model, "cpu", max_batch_tiles=2).launch([tiles])()
    (got,) = compiled.launch([tiles])()  # 2 tiles then 1
    again = torch.cat(compiled.launch([tiles[:2], tiles[2:]])())  # two images, one batch
    assert torch.allclose(got, eager, atol=1e-5, rtol=0) and torch.equal(got, again)
    assert counter.frame_count <= 2  # the first size, then one dynamic graph for all others


def test_the_tower_compiles_whole_for_every_batch_size(vision):
    """torch.compile traces the model in one graph (fullgraph: no break) with a dynamic batch size; aot_eager runs
    that graph without inductor's code generation (minutes of C++ compiling on this CPU; the GPU bench uses it)."""
    compiles_whole(vision[1])


def test_the_6b_tower_compiles_whole_too(tmp_path):
    """InternViT-6B's layout (RMSNorm, q and k normalized over the full width, no qkv bias) as well: the chart
    compiles every tower."""
    from tools.make_tiny_checkpoint import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "v1_5", family="internvl-chat-v1_5")
    compiles_whole(load_vision_model(read_model_config(path), path, "cpu", torch.float32))


def test_warm_up_compiles_before_the_first_request(vision):
    """What the GPU runner does at start-up: after warm_up, no batch size compiles again, and nothing was counted."""
    from services.vision_encoder import encoder

    cfg, model = vision
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    runner = VisionRunner(model, "cpu", max_batch_tiles=4, compile=counter)
    batches = encoder.BATCHES._value.get()
    runner.warm_up(cfg.vision.image_size)
    assert counter.frame_count == 2 and encoder.BATCHES._value.get() == batches
    tiles = torch.zeros((3, 448, 448, 3), dtype=torch.uint8)
    runner.launch([tiles])()
    runner.launch([tiles[:1]])()
    assert counter.frame_count == 2


def test_cuda_graphs_need_a_cuda_device(vision):
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        VisionRunner(vision[1], "cpu", max_batch_tiles=4, graph_tiles=4)


def test_utilization_counts_overlapping_batches_once(monkeypatch):
    from services.vision_encoder import encoder

    now = [100.0]
    monkeypatch.setattr(encoder.time, "monotonic", lambda: now[0])
    u = encoder.Utilization()
    u.begin()          # batch 1 launched at 100
    now[0] = 103.0
    u.begin()          # batch 2 launched while 1 runs
    now[0] = 106.0
    u.end()            # batch 1 done: still busy with 2
    assert u.busy_since == 100.0 and not u.spans
    now[0] = 109.0
    u.end()            # batch 2 done at 109: one busy span of 9 s, not 6 + 6
    now[0] = 110.0
    assert u.spans == deque([(100.0, 109.0)]) and u.value() == pytest.approx(9.0 / encoder.UTILIZATION_WINDOW_S)
