"""One shared model, many threads: the gate is fair and reentrant, and concurrent work equals solo work.

The app serves every browser session from one cached SpecialistSet. These tests drive that object
from several threads at once (estimations with different settings, answering, merged adapters
loaded and removed) and compare every result with the same work done alone.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import SAMPLES, make_spec

from esm_core.gate import ModelGate


def test_gate_is_first_come_first_served_and_reentrant():
    gate, order, started = ModelGate(poll_s=0.01), [], []
    gate_open = threading.Event()

    def first():
        with gate.hold("long"):
            with gate.hold("nested"):  # the owner may enter again
                started.append("first")
                gate_open.wait(5)
            order.append("first")

    def later(name):
        with gate.hold(name):
            order.append(name)

    t0 = threading.Thread(target=first)
    t0.start()
    while not started:
        time.sleep(0.001)
    ts = []
    for name in ("second", "third", "fourth"):
        t = threading.Thread(target=later, args=(name,))
        t.start()
        ts.append(t)
        while gate.queue_length() < len(ts):  # each one queued before the next starts
            time.sleep(0.001)
    gate_open.set()
    for t in [t0, *ts]:
        t.join(5)
    assert order == ["first", "second", "third", "fourth"]
    assert not gate.busy and gate.queue_length() == 0
    assert gate.typical_seconds("long") > 0


def test_a_waiter_is_told_its_place_and_a_cancelled_waiter_leaves_the_queue():
    gate = ModelGate(poll_s=0.01)
    release, seen = threading.Event(), []
    holder_in = threading.Event()

    def holder():
        with gate.hold("estimation"):
            holder_in.set()
            release.wait(5)

    threading.Thread(target=holder).start()
    holder_in.wait(5)

    class Cancel(Exception):
        pass

    def cancelled_waiter():
        def on_wait(ahead, expected, who):
            seen.append((ahead, who))
            raise Cancel  # as a Streamlit script does when the user clicks elsewhere
        with pytest.raises(Cancel):
            with gate.hold("answering", on_wait=on_wait):
                pass

    t = threading.Thread(target=cancelled_waiter)
    t.start()
    t.join(5)
    assert seen == [(1, "estimation")] and gate.queue_length() == 0
    release.set()
    with gate.hold("after"):  # nobody is stuck in front
        assert gate.held_by_me()


def _alpha_lam(res):
    return res.layer.alpha.clone(), {k: v.clone() for k, v in res.lam.items()}


def test_concurrent_estimations_and_answers_equal_their_solo_runs(world):
    from esm_core.answering.answerer import Answerer
    from esm_core.answering.prompts import Example, Item, few_shot_prompt
    from esm_core.pipeline import Workspace, estimate

    ws = Workspace.from_spec(make_spec(world), samples=SAMPLES)
    cfgs = [ws.spec.method.replace(seed=s, n_projections=64) for s in (1, 2, 3)]
    cfgs.append(ws.spec.method.replace(preset="paper", seed=4, n_projections=64))
    prompt = few_shot_prompt("You answer.", "Is it?", ["Yes", "No"], [],
                             Example([("Molecule", Item("molecule", "CCO")), ("Protein", Item("protein", "MKT"))]))
    answerer = Answerer(ws.sset, ws.encoders)
    solo = [_alpha_lam(estimate(ws, c)) for c in cfgs]
    solo_answers = {a: answerer.label_logprobs([prompt], a) for a in (None, *ws.sset.names)}

    results, answers, errors = {}, [], []

    def run_estimate(i):
        try:
            results[i] = _alpha_lam(estimate(ws, cfgs[i]))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    def run_answers():
        try:
            for _ in range(3):
                for a in (None, *ws.sset.names):
                    answers.append((a, answerer.label_logprobs([prompt], a)))
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    def run_merges():
        try:
            for j in range(3):
                name = f"merged_{j}"
                ws.sset.add_adapter(name, ws.sset.adapters["mol"].tensors, ws.sset.adapters["mol"].config)
                got = answerer.label_logprobs([prompt], name)
                answers.append(("mol", got))  # the same factors as the molecule specialist
                ws.sset.remove_adapter(name)
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=run_estimate, args=(i,)) for i in range(len(cfgs))]
    threads += [threading.Thread(target=run_answers), threading.Thread(target=run_merges)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i, (alpha, lam) in enumerate(solo):
        got_alpha, got_lam = results[i]
        assert torch.equal(got_alpha, alpha), i
        assert all(torch.equal(got_lam[k], lam[k]) for k in lam), i
    assert len(answers) == 3 * 4 + 3
    for a, got in answers:
        assert torch.allclose(got, solo_answers[a], atol=1e-5), a
    assert not ws.sset.gate.busy and ws.sset.extra_adapters == []
