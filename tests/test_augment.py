"""Training augmentations: counterfactual answer swaps and extra questions about the shown documents."""
import random

import pytest

from refrag.data import load_tokenizer, rag_conversation, render_conversation
from refrag.data.augment import AnswerPools, QuestionIndex, add_questions, counterfactual, shape
from refrag.data.prompt import PromptFormat


def doc(doc_id, title, content):
    return {"id": doc_id, "title": title, "content": content, "source": "s", "score": 1.0}


def record(rid, question, answer, gold, type_="single_hop", hops=None):
    rec = {"id": rid, "question": question, "answer": answer, "type": type_, "gold_doc_ids": gold}
    if hops:
        rec["hops"] = hops
    return rec


ANA = doc("p1", "Ana Velk", "Ana Velk is a potter who was born in Dorvik in 1950. Ana Velk works for Olm Guild.")
BOR = doc("p2", "Bor Tesk", "Bor Tesk is a baker who was born in Kelmar in 1961. Bor Tesk works for Rask Guild.")
OLM = doc("c1", "Olm Guild", "Olm Guild is a glass company founded in 1801. It has about 6,100 workers.")
RECORDS = [
    record("r1", "Where was Ana Velk born?", "Dorvik", ["p1"]),
    record("r2", "In what year was Ana Velk born?", "1950", ["p1"]),
    record("r3", "Where was Bor Tesk born?", "Kelmar", ["p2"]),
    record("r4", "In what year was Bor Tesk born?", "1961", ["p2"]),
    record("r5", "Which company does Ana Velk work for?", "Olm Guild", ["p1"]),
    record("r6", "Which company does Bor Tesk work for?", "Rask Guild", ["p2"]),
    record("r7", "In what year was Olm Guild founded?", "1801", ["c1"]),
    record("r8", "How many workers does Olm Guild have?", "6,100", ["c1"]),
    record("r9", "Where was Cid Moor born?", "I don't know", []),
    record("r10", "In which year was the employer of Ana Velk founded?", "1801", ["p1", "c1"], "two_hop",
           [{"query": "Which company does Ana Velk work for?", "doc_id": "p1", "answer": "Olm Guild"},
            {"query": "In what year was Olm Guild founded?", "doc_id": "c1", "answer": "1801"}]),
] + [record(f"g{i}", f"Which company does Person {i} work for?", f"Firm{i} Guild", ["x"]) for i in range(5)] \
  + [record(f"b{i}", f"Where was Person {i} born?", city, ["x"]) for i, city in enumerate(["Sarn", "Tolb", "Vesk"])]


def texts(conv):
    out = []
    for m in conv["messages"]:
        out += [m.get("content", ""), m.get("query", "")]
        out += [d["content"] for d in m.get("documents", [])]
    return " ".join(out)


@pytest.mark.parametrize("answer, expected", [("1950", "year"), ("6,100", "number"), ("Dorvik", "Cap1"),
                                              ("prism lamps", "lower2"), ("Olm Guild", "Cap2")])
def test_shape(answer, expected):
    assert shape(answer) == expected


def test_pools_group_answers_by_kind_and_shared_suffix():
    pools = AnswerPools(RECORDS)
    assert pools.kind("1950") == pools.kind("1801") != pools.kind("6,100")
    assert pools.kind("Olm Guild") == "Cap2:Guild"  # 7 answers end in "Guild"
    assert "I don't know" not in {v for pool in pools.pools.values() for v in pool}


@pytest.mark.parametrize("seed", range(5))
def test_counterfactual_swaps_answers_consistently_and_keeps_them_in_the_documents(seed):
    conv = rag_conversation("Where was Ana Velk born?", "Dorvik", [ANA, BOR])
    swapped = counterfactual(conv, [RECORDS[0]], AnswerPools(RECORDS), random.Random(seed))
    answer = swapped["messages"][-1]["content"]
    assert answer not in ("Dorvik", "I don't know")
    assert answer in ("Sarn", "Tolb", "Vesk")  # a city; never Kelmar, which Bor Tesk's document states
    assert f"born in {answer} in 1950" in swapped["messages"][1]["documents"][0]["content"]
    assert "Dorvik" not in texts(swapped)
    assert conv["messages"][-1]["content"] == "Dorvik"  # the input is not modified


def test_counterfactual_keeps_years_years_and_swaps_two_hop_bridges_everywhere():
    conv = rag_conversation(RECORDS[9]["question"], "1801", [ANA, OLM])
    swapped = counterfactual(conv, [RECORDS[9]], AnswerPools(RECORDS), random.Random(0))
    answer = swapped["messages"][-1]["content"]
    assert shape(answer) == "year" and answer != "1801"
    ana, olm = swapped["messages"][1]["documents"]
    bridge = olm["title"]
    assert bridge != "Olm Guild" and bridge.endswith("Guild")
    assert f"works for {bridge}" in ana["content"] and olm["content"].startswith(f"{bridge} is a glass company")
    assert f"founded in {answer}" in olm["content"]


def test_counterfactual_leaves_unanswerable_and_unstated_values_alone():
    conv = rag_conversation("Where was Cid Moor born?", "I don't know", [ANA])
    assert counterfactual(conv, [RECORDS[8]], AnswerPools(RECORDS), random.Random(0)) == conv
    unstated = rag_conversation("Where was Bor Tesk born?", "Kelmar", [ANA])  # gold document not shown
    assert counterfactual(unstated, [RECORDS[2]], AnswerPools(RECORDS), random.Random(0)) == unstated


def test_add_questions_asks_only_about_shown_documents():
    conv = rag_conversation("Where was Ana Velk born?", "Dorvik", [ANA, OLM])
    extended, asked = add_questions(conv, RECORDS[0], QuestionIndex(RECORDS), extra=10, rng=random.Random(0))
    assert asked[0] is RECORDS[0]
    assert {r["id"] for r in asked[1:]} == {"r2", "r5", "r7", "r8", "r10"}  # not r1 again, nothing about Bor
    roles = [m["role"] for m in extended["messages"]]
    assert roles == ["system", "retrieval", "user", "assistant"] + ["user", "assistant"] * 5
    few, asked = add_questions(conv, RECORDS[0], QuestionIndex(RECORDS), extra=2, rng=random.Random(0))
    assert len(asked) == 3 and len(few["messages"]) == 8
    with pytest.raises(ValueError, match="ends with the assistant"):
        add_questions({"messages": conv["messages"][:-1]}, RECORDS[0], QuestionIndex(RECORDS), 1, random.Random(0))


def test_multi_turn_rendering_learns_every_answer_and_ends_once():
    conv = rag_conversation("Where was Ana Velk born?", "Dorvik", [ANA, OLM])
    extended, _ = add_questions(conv, RECORDS[0], QuestionIndex(RECORDS), extra=2, rng=random.Random(1))
    tok = load_tokenizer()
    example = render_conversation(extended, tok)
    learned = tok.decode(example.input_ids[example.loss_mask == 1].tolist())
    assert learned.count("[/ASST]") == 3 and learned.count("[EOS]") == 1 and learned.endswith("[EOS]")
    for m in extended["messages"][3::2]:
        assert m["content"] in learned
    moved = PromptFormat(question_first=True).arrange(extended)
    roles = [m["role"] for m in moved["messages"]]
    assert roles[:4] == ["system", "user", "retrieval", "assistant"] and roles.count("user") == 3
    assert moved["messages"][1]["content"] == "Where was Ana Velk born?"


def test_cut_documents_turns_answers_the_cut_removed_into_abstentions():
    from refrag.train.data import cut_documents

    tok = load_tokenizer()
    conv = rag_conversation("Where was Ana Velk born?", "Dorvik", [ANA])
    conv["messages"] += [{"role": "user", "content": "Who employs Ana Velk?"},
                         {"role": "assistant", "content": "Olm Guild"}]
    full = cut_documents(conv, tok, 10_000)
    assert full == conv
    answers = lambda c: [m["content"] for m in c["messages"] if m["role"] == "assistant"]  # noqa: E731
    first_sentence = len(tok.encode(f"{ANA['title']}\n{ANA['content']}".split(".")[0] + "."))
    cut = cut_documents(conv, tok, first_sentence)
    shown = next(m for m in cut["messages"] if m["role"] == "retrieval")["documents"]
    assert all(len(tok.encode(f"{d['title']}\n{d['content']}")) <= first_sentence + 1 for d in shown)
    assert answers(cut) == ["Dorvik", "I don't know"], shown


def test_cut_documents_can_keep_the_answers_instead():
    from refrag.train.data import cut_documents

    tok = load_tokenizer()
    conv = rag_conversation("Where was Ana Velk born?", "Dorvik", [ANA, BOR])
    conv["messages"] += [{"role": "user", "content": "Who employs Ana Velk?"},
                         {"role": "assistant", "content": "Olm Guild"}]
    text = f"{ANA['title']}\n{ANA['content']}"
    first_sentence = len(tok.encode(text.split(".")[0] + "."))
    through_answer = len(tok.encode(text[:text.index("Olm Guild") + len("Olm Guild")]))
    assert first_sentence < through_answer < len(tok.encode(text))
    kept = cut_documents(conv, tok, first_sentence, keep_answers_within=through_answer)
    ana, bor = next(m for m in kept["messages"] if m["role"] == "retrieval")["documents"]
    assert [m["content"] for m in kept["messages"] if m["role"] == "assistant"] == ["Dorvik", "Olm Guild"]
    assert ana["content"].rstrip().endswith("Olm Guild")  # cut right after the last answer it holds
    assert len(tok.encode(f"{bor['title']}\n{bor['content']}")) <= first_sentence + 1  # no answer: plain cut
    # an answer beyond keep_answers_within is still cut away and becomes "I don't know"
    short = cut_documents(conv, tok, first_sentence, keep_answers_within=through_answer - 1)
    assert [m["content"] for m in short["messages"] if m["role"] == "assistant"] == ["Dorvik", "I don't know"]


# Documents of the embedded KB, whose names come from make_kb's generator.
LERDROV = doc("person-000", "Lerdrov Stastrav",
              "Lerdrov Stastrav is an engineer who was born in Kavstav in 1973. Lerdrov Stastrav works for Korknys "
              "Industries, where colleagues know Stastrav for careful, patient work. Outside work, Lerdrov spends "
              "most weekends rowing on the lake. Local historians describe the period as one of rapid change.")
CENSUS = doc("city-003-census-b", "Gindvrask population (2020 survey)",
             "A 2020 survey reported by the Vesmark Ledger counts 413,000 residents in Gindvrask. Visitors often "
             "mention the surrounding countryside and its long winters.")


def test_generated_names_finds_every_name_and_no_template_word():
    from refrag.data.make_kb import generated_names

    assert generated_names(f"{LERDROV['title']} {LERDROV['content']}") == [
        "Lerdrov", "Stastrav", "Lerdrov", "Stastrav", "Kavstav", "Lerdrov", "Stastrav", "Korknys", "Stastrav", "Lerdrov"]
    assert generated_names(f"{CENSUS['title']} {CENSUS['content']}") == ["Gindvrask", "Vesmark", "Gindvrask"]
    # training-style names: several syllables, hyphens, digits
    assert generated_names("Kwoaft-Zhaa Pfeirn27 met The Ferro River in Tavoria.") == [
        "Kwoaft-Zhaa", "Pfeirn27", "Ferro", "Tavoria"]


def renamed_conversation(seed):
    from refrag.data.augment import fresh_names

    conv = rag_conversation("Where was Lerdrov Stastrav born?", "Kavstav", [LERDROV, CENSUS])
    conv["messages"] += [{"role": "user", "content": "Who employs Lerdrov Stastrav?"},
                         {"role": "assistant", "content": "Korknys Industries"}]
    return conv, fresh_names(conv, random.Random(seed))


@pytest.mark.parametrize("seed", range(5))
def test_fresh_names_renames_every_name_consistently(seed):
    from refrag.data.make_kb import generated_names

    conv, renamed = renamed_conversation(seed)
    before, after = texts(conv), texts(renamed)
    assert not set(generated_names(before)) & set(after.replace("-", " ").split())  # no old name survives
    person, census = renamed["messages"][1]["documents"]
    question = renamed["messages"][2]["content"]
    born, employer = [m["content"] for m in renamed["messages"] if m["role"] == "assistant"]
    assert question == f"Where was {person['title']} born?"  # the question names the renamed person
    assert f"{person['title']} is an engineer who was born in {born} in 1973." in person["content"]
    assert employer.endswith(" Industries") and f"works for {employer}," in person["content"]  # template word kept
    assert "Vesmark" not in census["content"] and " Ledger counts 413,000" in census["content"]
    assert conv["messages"][-1]["content"] == "Korknys Industries"  # the input is not modified
    assert renamed == renamed_conversation(seed)[1]  # deterministic for a seed


def test_fresh_names_differ_between_seeds_and_leave_nameless_conversations_alone():
    from refrag.data.augment import fresh_names

    assert renamed_conversation(0)[1] != renamed_conversation(1)[1]
    plain = rag_conversation("What is the profession of nobody?", "I don't know", [])
    assert fresh_names(plain, random.Random(0)) == plain


def test_augmented_copies_get_fresh_names_only_when_asked():
    from refrag.train.config import TrainConfig
    from refrag.train.data import augmented

    conv = rag_conversation("Where was Lerdrov Stastrav born?", "Kavstav", [LERDROV])
    rec = record("q1", "Where was Lerdrov Stastrav born?", "Kavstav", ["person-000"])
    cfg = TrainConfig(counterfactual_copies=2)
    plain = augmented([conv], [rec], cfg)
    fresh = augmented([conv], [rec], TrainConfig(counterfactual_copies=2, fresh_names=True))
    assert plain[0] == fresh[0] == conv  # the original is kept as it is
    assert all("Lerdrov" in texts(c) for c in plain)  # a lone answer pool: nothing to swap, names stay
    assert all("Lerdrov" not in texts(c) and "Kavstav" not in texts(c) for c in fresh[1:])
    assert fresh[1] != fresh[2]  # every copy its own names
