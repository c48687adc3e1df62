"""Log lines: text with key=value fields, or one JSON object per line (LOG_FORMAT=json)."""
import json
import logging

from services.common.settings import _Formatter


def record(**fields) -> logging.LogRecord:
    r = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, "chat request", None, None)
    r.fields = fields
    return r


def test_json_lines_carry_the_fields():
    line = _Formatter(as_json=True).format(record(request_id="abc", status=200, ttft_s=0.12))
    out = json.loads(line)
    assert out["msg"] == "chat request" and out["logger"] == "gateway.access" and out["level"] == "INFO"
    assert (out["request_id"], out["status"], out["ttft_s"]) == ("abc", 200, 0.12)


def test_text_lines_end_with_the_fields():
    line = _Formatter(as_json=False).format(record(request_id="abc", status=200))
    assert line.endswith("gateway.access: chat request request_id=abc status=200")
