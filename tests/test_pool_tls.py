"""mTLS between the gateway and the pools, with certificates made here: a CA, the pools' server certificate (named
`pools.internal`, not the address: the gateway's server-name setting), the gateway's client certificate, and a
stranger's client certificate from another CA. The health service stays reachable in plaintext on its own port."""
import argparse
import datetime

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from internvl.serving.v1 import serving_pb2 as pb
from internvl.serving.v1 import serving_pb2_grpc as pb_grpc
from services.common.grpc_utils import channel_credentials, create_channel, server_credentials, set_serving, \
    start_server
from services.gateway.balancer import Balancer
from tests.conftest import data_url, noise_image
from tests.test_balancer import FakeDecoder, generate, wait_for
from tools.run_local import free_port, start_stack

SERVER_NAME = "pools.internal"


def _issue(name: str, key, issuer: x509.Certificate | None, issuer_key, usage=None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1)))
    if issuer is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files by role: ca, server.{crt,key}, client.{crt,key}, stranger.{crt,key} (signed by another CA)."""
    out, files = tmp_path_factory.mktemp("pki"), {}

    def write(name: str, cert: x509.Certificate, key=None) -> None:
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.crt"] = str(out / f"{name}.crt")
        if key is not None:
            (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))
            files[f"{name}.key"] = str(out / f"{name}.key")

    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("ca", "other-ca", "server", "client",
                                                                          "stranger")}
    ca = _issue("test CA", keys["ca"], None, None)
    other_ca = _issue("another CA", keys["other-ca"], None, None)
    write("ca", ca)
    write("server", _issue(SERVER_NAME, keys["server"], ca, keys["ca"], ExtendedKeyUsageOID.SERVER_AUTH),
          keys["server"])
    write("client", _issue("gateway", keys["client"], ca, keys["ca"], ExtendedKeyUsageOID.CLIENT_AUTH), keys["client"])
    write("stranger", _issue("gateway", keys["stranger"], other_ca, keys["other-ca"],
                             ExtendedKeyUsageOID.CLIENT_AUTH), keys["stranger"])
    return files


@pytest.fixture
async def tls_decoder(pki):
    """A fake decoder whose gRPC port requires a client certificate from the CA; health in plaintext on another."""
    args = argparse.Namespace(tls_cert=pki["server.crt"], tls_key=pki["server.key"], tls_client_ca=pki["ca.crt"])
    decoder = FakeDecoder(info=pb.ModelInfo(model="tiny", checkpoint="c1", max_model_len=64))
    port, health_port = free_port(), free_port()
    server, health, health_server = await start_server(
        lambda s: pb_grpc.add_LlmDecoderServicer_to_server(decoder, s), "internvl.serving.v1.LlmDecoder", port,
        server_credentials(args), health_port)
    await set_serving(health, "internvl.serving.v1.LlmDecoder")
    yield decoder, f"127.0.0.1:{port}", f"127.0.0.1:{health_port}"
    await server.stop(None)
    await health_server.stop(None)


async def info_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    async with channel:
        try:
            await pb_grpc.LlmDecoderStub(channel).Info(pb.InfoRequest(), timeout=5)
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            return e.code()


async def test_pools_take_calls_only_from_clients_with_a_certificate_of_their_ca(pki, tls_decoder):
    decoder, addr, _ = tls_decoder
    gateway = channel_credentials(pki["ca.crt"], pki["client.crt"], pki["client.key"])
    balancer = Balancer("LLM decoder", pb_grpc.LlmDecoderStub, check=lambda info: None, credentials=gateway,
                        server_name=SERVER_NAME)
    try:
        balancer.set_endpoints([addr])
        await wait_for(lambda: addr in balancer.endpoints, "the endpoint's facts over mTLS")
        assert (await generate(balancer))[-1].finish_reason == "length" and decoder.calls == 1
    finally:
        await balancer.close()

    refused = {
        "plaintext": create_channel(addr),
        "no client certificate": create_channel(addr, credentials=channel_credentials(pki["ca.crt"]),
                                                server_name=SERVER_NAME),
        "a certificate of another CA": create_channel(addr, server_name=SERVER_NAME, credentials=channel_credentials(
            pki["ca.crt"], pki["stranger.crt"], pki["stranger.key"])),
        "a server name its certificate lacks": create_channel(addr, credentials=gateway),  # 127.0.0.1
    }
    assert {why: await info_code(channel) for why, channel in refused.items()} == {
        why: grpc.StatusCode.UNAVAILABLE for why in refused}
    assert decoder.calls == 1


async def test_health_stays_plaintext_on_its_own_port_without_the_service(tls_decoder):
    """What the kubelet's gRPC probes (which cannot present certificates) reach when the pools require mTLS."""
    _, _, health_addr = tls_decoder
    async with create_channel(health_addr) as channel:
        for service in ("", "internvl.serving.v1.LlmDecoder"):
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:  # the pool's own service is only behind mTLS
            await pb_grpc.LlmDecoderStub(channel).Info(pb.InfoRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_stack_over_mtls(pki, tiny_checkpoint, tmp_path):
    """The three processes with the settings the chart sets: the pools' GRPC_TLS_*, the gateway's POOL_TLS_*."""
    env = {"GRPC_TLS_CERT": pki["server.crt"], "GRPC_TLS_KEY": pki["server.key"], "GRPC_TLS_CLIENT_CA": pki["ca.crt"],
           "POOL_TLS_CA": pki["ca.crt"], "POOL_TLS_CERT": pki["client.crt"], "POOL_TLS_KEY": pki["client.key"],
           "POOL_TLS_SERVER_NAME": SERVER_NAME}
    with open(tmp_path / "stack.log", "w") as log:
        stack = start_stack(str(tiny_checkpoint), redis=False, log=log, extra_env=env)
    try:
        r = httpx.post(stack.gateway_url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny-internvl2_5", "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(noise_image(64, 64, seed=7))}},
                {"type": "text", "text": "Describe."}]}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
    finally:
        stack.stop()
