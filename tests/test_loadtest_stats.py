"""The benchmark's own arithmetic: which gaps count as stalls during a long prefill, llmfleet/peer ratios, and the
client's own share of the gateway overhead and the machine's floor under it."""

import asyncio

from loadtest.long_prompts import gaps_during_prefills
from loadtest.overhead import bare_round_trips, client_ttfts
from loadtest.stats import RequestTrace, ratio_table, summarise
from shared.settings import DEFAULT_MODEL


def test_only_gaps_of_other_streams_overlapping_a_probe_prefill_count():
    probe = RequestTrace(started=10.0, first_token=12.0, token_times=[12.0, 12.1], ended=12.1, prompt_index=3)
    running = RequestTrace(started=0.0, first_token=1.0, token_times=[9.0, 9.5, 11.5, 13.0, 13.1], prompt_index=0)
    assert gaps_during_prefills([probe, running], probes={3}) == [2.0, 1.5]


def test_ratio_rows_pair_llmfleet_with_the_peer_at_the_same_workload_and_concurrency():
    def run(label: str, tokens: int, peer: bool, concurrency: int):
        trace = RequestTrace(started=0.0, first_token=0.5, token_times=[0.5, 1.0], ended=1.0, completion_tokens=tokens)
        return summarise(label, concurrency, [trace], 1.0, "chat", peer)

    rows = ratio_table([run("ours", 40, False, 8), run("peer", 20, True, 8), run("peer", 5, True, 1)])
    assert rows.splitlines()[2].startswith("| chat | ours | peer | 8 | 2.00 |")
    assert len(rows.splitlines()) == 3


def test_the_client_share_of_the_overhead_is_timed_without_a_server_on_a_canned_stream():
    ttfts = asyncio.run(client_ttfts(DEFAULT_MODEL, 3, seed=0))
    assert len(ttfts) == 3 and all(0 < t < 1 for t in ttfts)


def test_the_floor_under_the_overhead_is_timed_against_a_bare_server_in_a_process_of_its_own():
    times = asyncio.run(bare_round_trips(3))
    assert sorted(times) == ["after_pause", "back_to_back"]
    assert all(len(t) == 3 and all(0 < x < 1 for x in t) for t in times.values())
