"""Stop strings over a stream of text deltas: the answer ends before the first one, whatever the split."""
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.llm_decoder.detokenizer import StopStrings


def run(stop: list[str], deltas: list[str], skip: int = 0, include: bool = False) -> tuple[str, bool, list[str]]:
    """Push the deltas, the first `skip` without looking for stop strings (min_tokens)."""
    s, sent, seen = StopStrings(stop, include), [], ""
    for k, delta in enumerate(deltas):
        seen += delta
        piece, stopped = s.push(delta, look=k >= skip)
        sent.append(piece)
        if stopped:
            return "".join(sent), True, sent
        # Held back: exactly the unsent tail of the text, and only while it could still begin a stop string.
        assert "".join(sent) + s.held == seen
        assert s.held == "" or any(x.startswith(s.held) and x != s.held for x in stop)
    sent.append(s.finish())
    return "".join(sent), False, sent


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.text("abcd", max_size=5), max_size=8), st.integers(0, 9))
@example(stop=["b", "aba"], deltas=["a", "b", "a"], skip=0)  # "aba" starts first but completes after "b" stopped it
@example(stop=["ab", "abcd"], deltas=["ab", "x"], skip=1)  # "ab" ended in text pushed without looking
def test_the_answer_ends_before_the_first_stop_string(stop, deltas, skip):
    # Generation ends with the first delta (from delta `skip` on) after which the text holds a stop string that ends
    # past the first `skip` deltas' text; the answer is the text before the earliest such one (one that would
    # complete only later never comes).
    unseen = len("".join(deltas[:skip]))
    text, hits = "", []
    for k, delta in enumerate(deltas):
        text += delta
        hits = [(i, len(x)) for x in stop for i in range(len(text)) if text.startswith(x, i) and i + len(x) > unseen]
        if hits and k >= skip:
            break
    stopped = bool(hits) and k >= skip
    assert run(stop, deltas, skip)[:2] == ((text[:min(hits)[0]], True) if stopped else (text, False))
    # included: the answer ends with the stop string that starts first (the shorter of two that start together)
    assert run(stop, deltas, skip, include=True)[:2] == ((text[:sum(min(hits))], True) if stopped else (text, False))


def test_split_over_deltas_and_in_the_first_delta():
    assert run(["</answer>"], ["The end", "</ans", "wer>", "more"]) == ("The end", True, ["The end", "", ""])
    assert run(["STOP"], ["STOP now"])[:2] == ("", True)
    # A false start is sent once it can no longer be a stop string.
    assert run(["abc"], ["xa", "b", "d"])[2] == ["x", "", "abd", ""]
    assert run([], ["a", "b"])[2] == ["a", "b", ""]
