"""Stop strings over a stream of text deltas: the answer ends before the first one, whatever the split."""
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.llm_decoder.detokenizer import StopStrings


def run(stop: list[str], deltas: list[str]) -> tuple[str, bool, list[str]]:
    s, sent, seen = StopStrings(stop), [], ""
    for delta in deltas:
        seen += delta
        piece, stopped = s.push(delta)
        sent.append(piece)
        if stopped:
            return "".join(sent), True, sent
        # Held back: exactly the unsent tail of the text, and only while it could still begin a stop string.
        assert "".join(sent) + s.held == seen
        assert s.held == "" or any(x.startswith(s.held) and x != s.held for x in stop)
    sent.append(s.finish())
    return "".join(sent), False, sent


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.text("abcd", max_size=5), max_size=8))
@example(stop=["b", "aba"], deltas=["a", "b", "a"])  # "aba" starts first but would complete after "b" stopped it
def test_the_answer_ends_before_the_first_stop_string(stop, deltas):
    # Generation ends with the first delta after which the text holds a stop string; the answer is the text before
    # the earliest one it holds then (one that would complete only later never comes).
    text, hits = "", []
    for delta in deltas:
        text += delta
        hits = [i for i in (text.find(x) for x in stop) if i >= 0]
        if hits:
            break
    out, stopped, _ = run(stop, deltas)
    assert (out, stopped) == ((text[:min(hits)], True) if hits else (text, False))


def test_split_over_deltas_and_in_the_first_delta():
    assert run(["</answer>"], ["The end", "</ans", "wer>", "more"]) == ("The end", True, ["The end", "", ""])
    assert run(["STOP"], ["STOP now"])[:2] == ("", True)
    # A false start is sent once it can no longer be a stop string.
    assert run(["abc"], ["xa", "b", "d"])[2] == ["x", "", "abd", ""]
    assert run([], ["a", "b"])[2] == ["a", "b", ""]
