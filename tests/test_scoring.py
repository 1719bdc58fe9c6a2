"""Answer extraction and matching on the answer forms R1 and MATH-style references write, and
hesitation counting with the user's words. Every expectation is written out by hand."""

from __future__ import annotations

import pytest

from tca import TcaError
from tca.adapted.generation import (
    HESITATION_WORDS,
    answers_match,
    boxed,
    count_hesitations,
    count_rechecks,
    final_answer,
    normalize_answer,
)
from tca.cache.template import THINK_CLOSE

# (what follows </think>, the answer extracted, the reference it is checked against, match?)
TABLE = [
    # the demo pair answers bare
    ("\n\n7", "7", "7", True),
    ("\n\n7", "7", "3", False),
    # fractions, roots and nested braces: the old [^{}]* regex found nothing in any of these
    ("\n\nThe answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "\\frac{1}{2}", True),
    ("\n\n$\\boxed{\\dfrac{1}{2}}$", "\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\n\n$\\boxed{\\tfrac{1}{2}}$", "\\tfrac{1}{2}", "\\frac12", True),
    ("\n\n\\boxed{\\sqrt{3}}", "\\sqrt{3}", "\\sqrt3", True),
    ("\n\n\\boxed{\\sqrt{3}}", "\\sqrt{3}", "3", False),
    ("\n\n\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt2}{2}", True),
    ("\n\n\\boxed{2^{\\frac{1}{3}}}", "2^{\\frac{1}{3}}", "2^{\\frac{1}{3}}", True),
    ("\n\n\\boxed{\\{1, 2\\}}", "\\{1, 2\\}", "\\{1,2\\}", True),  # escaped braces do not nest
    # spacing, periods, delimiters
    ("\n\n\\boxed{ 42 }", "42", "42", True),
    ("\n\n\\boxed{42.}", "42.", "42", True),
    ("\n\n\\boxed{42}.", "42", "42", True),
    ("\n\n\\boxed{10,\\!080}", "10,\\!080", "10080", True),
    ("\n\n\\boxed{1,000}", "1,000", "1000", True),
    ("\n\n\\boxed{(1, 2)}", "(1, 2)", "(1,2)", True),
    ("\n\n\\boxed{(1, 2)}", "(1, 2)", "(2,1)", False),
    ("\n\n\\boxed{\\left( 1, 2 \\right)}", "\\left( 1, 2 \\right)", "(1,2)", True),
    ("\n\n\\boxed{a \\, b}", "a \\, b", "ab", True),
    ("\n\n\\boxed{$5$}", "$5$", "5", True),
    ("\n\n\\boxed{\\(5\\)}", "\\(5\\)", "5", True),
    # numbers written differently
    ("\n\n\\boxed{.5}", ".5", "0.5", True),
    ("\n\n\\boxed{2.50}", "2.50", "2.5", True),
    ("\n\n\\boxed{3.0}", "3.0", "3", True),
    ("\n\n\\boxed{07}", "07", "7", False),  # leading zeros are kept: "07" is not a number a reference writes
    ("\n\n\\boxed{0.5}", "0.5", "\\frac{1}{2}", False),  # equal values, different forms: not judged
    ("\n\n\\boxed{1/2}", "1/2", "\\frac{1}{2}", True),
    ("\n\n\\boxed{-1/2}", "-1/2", "-\\frac{1}{2}", True),
    # units, degrees, percent, text, a variable in front
    ("\n\n\\boxed{10\\text{ cm}}", "10\\text{ cm}", "10", True),
    ("\n\n\\boxed{90^\\circ}", "90^\\circ", "90", True),
    ("\n\n\\boxed{90^{\\circ}}", "90^{\\circ}", "90", True),
    ("\n\n\\boxed{50\\%}", "50\\%", "50", True),
    ("\n\n\\boxed{\\text{(B)}}", "\\text{(B)}", "(B)", True),
    ("\n\n\\boxed{\\textbf{(C)}}", "\\textbf{(C)}", "(B)", False),
    ("\n\n\\boxed{x = 5}", "x = 5", "5", True),
    # which box counts
    ("\n\nFirst \\boxed{3}, no: \\boxed{4}", "4", "4", True),
    ("\n\nFirst \\boxed{3}, no: \\boxed{4}", "4", "3", False),
    ("\n\n\\fbox{12}", "12", "12", True),
    ("\n\n\\boxed {12}", "12", "12", True),
    ("\n\n$\\boxed 5$.", "5", "5", True),  # the unbraced form MATH writes
    ("\n\n\\boxed 5", "5", "5", True),
    ("\n\n\\boxed5", "5", "5", True),
    ("\n\nso \\boxed{42} done", "42", "42", True),
    ("\n\n\\boxedsymbol{3}", "\\boxedsymbol{3}", "3", False),  # another command, not a box
    # no answer: an unclosed box, a box with nothing in it, the last box unclosed
    ("\n\n\\boxed{\\frac{1}{2}", None, "\\frac{1}{2}", False),
    ("\n\n\\boxed{3} and then \\boxed{4", None, "3", False),
    ("\n\n\\boxed", None, "3", False),
    ("\n\n\\boxed $", None, "3", False),
]


@pytest.mark.parametrize("tail, extracted, reference, match", TABLE)
def test_answer_table(tail, extracted, reference, match):
    response = "<think>\nLet me see. \\boxed{999} is not it.\n" + THINK_CLOSE + tail
    assert final_answer(response) == extracted
    assert answers_match(final_answer(response), reference) is match
    # the reference is read the same way from a reference response
    assert answers_match(final_answer(response), final_answer(f"x{THINK_CLOSE}\\boxed{{{reference}}}")) is match


def test_no_answer_without_closing_the_thinking():
    # a truncated R1 trace: its boxes are drafts inside the thinking
    assert final_answer("<think>\nSo \\boxed{5}, wait") is None
    assert final_answer("<think>\nSo \\boxed{5}\n</think>\n\n") == ""
    assert final_answer(f"a {THINK_CLOSE} b {THINK_CLOSE} \\boxed{{1}} c") == "1"  # after the last close
    assert not answers_match(None, "5") and not answers_match("5", None)


def test_boxed_lists_every_top_level_box():
    assert boxed("\\boxed{a} x \\fbox{b{c}} \\boxed d$ \\boxed{e") == ["a", "b{c}", "d", None]
    assert boxed("\\boxed{\\boxed{1}} \\boxed{2}") == ["\\boxed{1}", "2"]
    assert boxed("nothing here") == []


@pytest.mark.parametrize("raw, normal", [
    ("  $\\dfrac{3}{4}$. ", "\\frac{3}{4}"),
    ("\\left[ 0, \\infty \\right)", "[0,\\infty)"),
    ("\\frac 1 2", "\\frac{1}{2}"),
    ("\\sqrt[3]{2}", "\\sqrt[3]{2}"),
    ("-0.250", "-0.25"),
    ("1,234,567.00", "1234567"),
    ("\\text{Monday}", "Monday"),
    ("x\\quad y~z", "xyz"),
    ("x \\rightarrow 0", "x\\rightarrow0"),  # \left and \right go only as whole commands
])
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_hesitations_count_the_given_words_as_whole_words():
    text = "Wait, 2+3=5. Hmm. Waiting is over. Alternatively: wait. Wait! Hmmm, Hmm"
    assert HESITATION_WORDS == ("Wait",)
    assert count_hesitations(text) == 2
    assert count_hesitations(text, ["Wait", "Hmm", "Alternatively"]) == 2 + 2 + 1
    assert count_hesitations(text, [" Hmm"]) == 2  # a token's leading space is not part of the word
    assert count_hesitations(text, ["wait"]) == 1
    with pytest.raises(TcaError, match="no hesitation words"):
        count_hesitations(text, [" ", ""])


@pytest.mark.parametrize("text, rechecks, words", [
    ("9+7=16\nWait, let me check: 9+7=16. Yes.\n6+4=10\nWait, let me check: 6+4=10. Yes.\n</think>\n\n6", 2, 2),
    ("Wait, is 7*8=56? Hmm, yes.", 2, 2),  # a sentence opens after "? "
    ("So x = 3. Wait, that is wrong. Hmm... let me redo it. Alternatively, we could", 3, 3),
    ("Wait a second", 1, 1),
    ("5+4=Wait\nWait+1=2\n9+Wait=18", 0, 3),  # the word where a digit belongs
    ("Wait\nWait=9\nWait", 0, 3),  # the word alone on a line, nothing after it
    ("I wait. He said Wait, no", 0, 1),  # mid-sentence; lower case is another word
])
def test_rechecks_are_hesitation_words_that_open_a_sentence_with_words_after(text, rechecks, words):
    hesitations = ["Wait", "Hmm", "Alternatively"]
    assert count_rechecks(text, hesitations) == rechecks
    assert count_hesitations(text, hesitations) == words

