"""The benchmark's own arithmetic: which gaps count as stalls during a long prefill, llmfleet/peer ratios, the
client's own share of the gateway overhead and the machine's floor under it, the relay's own SSE reader, and the
report's judgement against issue 8's targets."""

import asyncio

import httpx

from loadtest.long_prompts import gaps_during_prefills
from loadtest.overhead import bare_round_trips, canned_stream, client_ttfts
from loadtest.servers import Server
from loadtest.stats import RequestTrace, Summary, error_lines, failure_reason, ratio_table, summarise
from loadtest.targets import targets_table
from loadtest.workload import client_for, stream_one, stream_one_raw
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


def test_the_relays_own_sse_reader_reads_a_stream_as_the_openai_client_does():
    server, messages = Server("canned", "http://canned/v1", DEFAULT_MODEL), [{"role": "user", "content": "hi"}]

    async def both() -> tuple[RequestTrace, RequestTrace]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(canned_stream)) as http:
            return (await stream_one(client_for(server, http), server, messages, 1, True),
                    await stream_one_raw(http, server, messages, 1, True))  # fmt: skip

    official, raw = asyncio.run(both())
    assert raw.error is None and official.error is None
    assert (raw.text, raw.completion_tokens, raw.prompt_tokens) == (official.text, official.completion_tokens, 1)
    assert len(raw.token_times) == len(official.token_times) == 1 and raw.first_token is not None


def test_each_run_says_why_its_requests_failed():
    ok = RequestTrace(started=0.0, first_token=0.5, token_times=[0.5], ended=1.0, completion_tokens=1)
    failed = [RequestTrace(started=0.0, error="ReadTimeout: "), RequestTrace(started=0.0, error="ReadTimeout: ")]
    summary = summarise("ours", 128, [ok, *failed, RequestTrace(started=0.0, error="ValueError: expired")], 1.0)
    assert summary.errors == 3
    assert summary.error_reasons == {"ReadTimeout: ": 2, "ValueError: expired": 1}
    assert error_lines([summary]).splitlines() == [
        "- chat, ours, c=128: 2 x ReadTimeout: ",
        "- chat, ours, c=128: 1 x ValueError: expired",
    ]
    assert error_lines([summarise("ours", 1, [ok], 1.0)]) == ""


def test_a_failure_names_the_causes_under_an_error_that_says_nothing():
    try:
        try:
            raise ConnectionResetError("reset by peer")
        except ConnectionResetError as reset:
            raise RuntimeError() from reset
    except RuntimeError as error:
        assert failure_reason(error) == "RuntimeError:  <- ConnectionResetError: reset by peer"
    assert failure_reason(ValueError("expired")) == "ValueError: expired"


def test_the_targets_table_judges_each_measured_target_and_names_the_unmeasured_fidelity():
    def run(workload: str, concurrency: int, tok_s: float, peer: bool = False, **extra) -> Summary:
        ttft = {"p50": 0.9, "p95": 0.3, "p99": 0.4}
        return Summary("run", concurrency, 8, 0, 1.0, int(tok_s), tok_s, 1.0, ttft, {}, {}, workload, peer, extra)

    rss = {"worker_rss": {"peak_rss_mib": 1500.0}}
    summaries = [
        run("chat", 32, 600, **rss), run("chat", 32, 200, peer=True), run("chat", 1, 70, **rss),
        run("long", 8, 80, itl_during_long_prefill={"p99": 0.2}, **rss), run("relay", 8, 9000),
    ]  # fmt: skip
    overhead = {"overhead_p50_s": 0.004, "bare_round_trip_p50_s": {"after_pause": 0.002}}
    rows = {line.split(" | ")[0][2:]: line for line in targets_table(summaries, overhead).splitlines()[2:]}
    assert rows["chat c=32"].endswith("| 600 (peer 200: 3.00x) | met |")
    assert rows["chat c=1"].endswith("| missed |")
    assert rows["long prompts, throughput"].endswith("| missed |") and rows["long prompts, TTFT p50"].endswith(
        "| met |"
    )
    assert rows["gateway + Redis overhead, c=1"].endswith("| met |") and rows["one gateway's relay"].endswith("| met |")
    assert "multi-turn TTFT p50, turns 2-4" not in rows, "not measured: no row"
    assert rows["perplexity, probe answers, weight memory"].endswith("| not in this report |")
    assert targets_table([], None) == ""
