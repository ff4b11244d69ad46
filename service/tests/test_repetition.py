"""The repetition-loop detector: what the engine cuts and the benchmark counts."""

from pilotys_whisper.repetition import Loop, cut_loops, find_loops


def test_speech_that_repeats_a_little_is_not_a_loop():
    for text in ("Non, non, honnêtement je pense qu'il nous faut deux semaines de plus.",
                 "Merci, merci beaucoup. Oui oui, c'est ça.",
                 "Le 12 mars, le 12 avril et le 12 mai: trois dates, trois réunions.",
                 "très très très bien", ""):
        assert find_loops(text) == [], text


def test_a_word_said_again_and_again_is_a_loop():
    assert find_loops("Est-ce réaliste ? Non non non non non non non, je pense.") == [
        Loop(start=2, words=("non",), repeats=7)]


def test_a_phrase_said_again_and_again_is_a_loop_found_once():
    text = "Merci à tous à toi et à tous à toi et à tous à toi et à tous à toi et à la fin. Merci."
    [loop] = find_loops(text)
    assert loop.words == ("à", "tous", "à", "toi", "et") and loop.repeats == 4
    assert loop.start == 1 and loop.end == 21


def test_case_and_punctuation_do_not_hide_a_loop():
    assert find_loops("Oh, oh, Oh ! oh... OH, oh.")[0].repeats == 6


def test_cut_loops_keeps_the_first_occurrence_and_the_rest_of_the_text():
    assert cut_loops("Non, non, non, non, non, non, je pense.") == "Non, je pense."
    text = "Bon. Merci à tous à toi et à tous à toi et à tous à toi et à tous à toi et à la fin."
    assert cut_loops(text) == "Bon. Merci à tous à toi et à la fin."
    assert find_loops(cut_loops(text)) == []
    assert cut_loops("Rien à couper ici.") == "Rien à couper ici."
