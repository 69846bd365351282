"""Persona metrics: the similarity ranks the persona above off-persona text; run-on and repetition stats."""
from __future__ import annotations

import pytest

from personatune.metrics import distinct_n, paired_similarity, reply_stats


def test_similarity_ranks_persona_reference_above_off_persona():
    reference = ["Birthdays are just annual reminders that the grave is patient."]
    persona = paired_similarity(["Another year closer to the grave. How festive."], reference)[0]
    off = paired_similarity(["Yay, cake and balloons! I love parties so much!"], reference)[0]
    assert persona > off + 0.1
    assert -1.0 <= off < persona <= 1.0


def test_reply_stats_counts_run_ons_and_repetition():
    gens = [
        {"reply": "No.", "raw": "No.", "new_tokens": 3, "ended_by": "eos"},
        {"reply": "I am a leader", "raw": "I am a leader\n\n###", "new_tokens": 9, "ended_by": "marker"},
        {"reply": "a a a a", "raw": "a a a a", "new_tokens": 64, "ended_by": "length"},
        {"reply": "Fine.", "raw": "Fine.", "new_tokens": 3, "ended_by": "eos"},
    ]
    stats = reply_stats(gens)
    assert stats["run_on_rate"] == 0.5  # one wrote a marker, one hit the limit
    assert stats["mean_words"] == (1 + 4 + 4 + 1) / 4
    assert distinct_n(["a a a a"], 1) == 0.25 and distinct_n(["a b c"], 2) == 1.0


def test_loops_are_repeated_trigrams_or_the_token_limit():
    from personatune.metrics import loops

    def gen(reply, ended_by="eos"):
        return {"reply": reply, "raw": reply, "new_tokens": 10, "ended_by": ended_by}

    assert loops(gen("I'll tell you what to say. I'll tell you what to say. I'll tell you what to say."))
    assert loops(gen("a movie about a woman who is a woman who is a woman who is"))
    assert not loops(gen("I'll be there. I'll be there for a long time."))  # twice is speech, three times a loop
    assert not loops(gen("Funerals are honest. Weddings are funerals with cake, and cake is a lie."))
    assert loops(gen("The rain never stops", ended_by="length"))  # hit the token limit without ending
    stats = reply_stats([gen("No."), gen("it is it is it is it is")])
    assert stats["loop_rate"] == 0.5


def test_mean_distinct_averages_reply_sets_instead_of_pooling_them():
    from personatune.evaluate import mean_distinct

    same_twice = [{"reply": "a b c"}, {"reply": "a b c"}]  # bigrams ab, bc, ab, bc: 2 of 4 distinct
    varied = [{"reply": "x y"}, {"reply": "z w"}]  # 2 of 2
    assert mean_distinct([same_twice, varied], 2) == pytest.approx((0.5 + 1.0) / 2)
    pooled = distinct_n([g["reply"] for g in same_twice + varied], 2)
    assert pooled == pytest.approx(4 / 6) and pooled != mean_distinct([same_twice, varied], 2)
    assert mean_distinct([varied], 1) == 1.0
