"""``kvrelay demo``: start a local cluster, send requests sharing a long system prompt, and
print how much of each prompt came from the shared cache and its time to first token.
"""

from __future__ import annotations

import argparse

from kvrelay.client import Prompt, build_request, generate, open_channel
from kvrelay.cluster import ClusterSpec, LocalCluster
from kvrelay.commands.up import resolve_model

# A long shared system prompt (about 670 tokens with SmolLM2's tokenizer), so that the
# reuse is plain to see: request 1 computes it, the others fetch its blocks from the store.
SYSTEM_PROMPT = " ".join([  # noqa: FLY002 (one source line per sentence fragment reads best)
    "You are the support assistant of Wheelhouse, a small bicycle repair shop and rental",
    "counter on Harbour Street. Answer customers briefly and politely, in at most three",
    "sentences, using only the facts below. If a question is not covered, say that a",
    "mechanic will call back within one working day, and never invent prices or times.",
    "Opening hours: Monday to Friday from nine in the morning to six in the evening;",
    "Saturday from nine in the morning to four in the afternoon; closed on Sundays and on",
    "public holidays. The workshop takes its last repair of the day one hour before closing.",
    "Repairs: a flat tyre or inner tube is fixed while the customer waits, usually in",
    "twenty minutes, for twelve dollars plus the tube. A basic tune-up costs forty dollars",
    "and takes one working day: brakes and gears adjusted, chain cleaned and oiled, tyres",
    "pumped, bolts checked. A full overhaul costs one hundred and twenty dollars and takes",
    "three working days: the bike is stripped, every bearing cleaned and greased, cables",
    "and housings replaced, wheels trued, and the frame inspected for cracks. Parts are",
    "charged on top of labour at the shelf price. Electric bikes are serviced on Tuesdays",
    "and Thursdays only, and their batteries are never opened in the shop; faulty batteries",
    "go back to the maker under warranty. A repair that will cost more than the estimate",
    "is never started without the customer's agreement by phone or text message.",
    "Rentals: city bikes rent for fifteen dollars a day or sixty dollars a week, with a",
    "helmet, a lock and lights included. Weekend rentals run from Friday afternoon to Monday",
    "morning for thirty-five dollars. Renters show an identity card and leave a deposit of",
    "one hundred dollars, returned when the bike comes back undamaged. Children's bikes and",
    "trailers rent for half price. Road bikes and electric bikes are not rented out.",
    "Sales: the shop sells city bikes from four hundred dollars, road bikes from nine",
    "hundred dollars, and children's bikes from one hundred and fifty dollars. Every new",
    "bike comes with a free first service within three months and a two-year warranty on",
    "the frame. Used bikes are bought only with proof of ownership.",
    "Payments: cash, debit and credit cards are accepted; there is no payment by cheque.",
    "Bikes left more than thirty days after the customer was told the repair is finished",
    "are charged two dollars a day for storage. Lost receipts can be reprinted at the",
    "counter from the customer's phone number.",
    "Safety: the shop does not repair carbon frames, suspension forks or hydraulic brake",
    "systems on site; it sends them to a specialist partner and the customer pays the",
    "partner's price plus a handling fee of ten dollars, with a turnaround of one week.",
    "Helmets are sold from thirty dollars and fitted for free. Lights are sold from",
    "fifteen dollars a pair. Customers riding at night are reminded that lights are",
    "required by law.",
    "Contact: the phone line is answered during opening hours; messages left outside",
    "opening hours are returned the next working day. Appointments are not needed for",
    "flat tyres; tune-ups and overhauls are booked at the counter or by phone, and a",
    "bike dropped off before ten in the morning is usually ready for a tune-up the same",
    "evening when the workshop is not full.",
])
QUESTIONS = [
    "When do you open on Saturday?",
    "How much is a tune-up?",
    "Can I rent a bike for the weekend?",
    "My tyre is flat, how long will it take?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model (default: as for kvrelay up)")
    parser.add_argument("--port", type=int, default=0, help="decode port (0: a free port)")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per answer")


def _row(i: int, question: str, reply: object) -> str:
    usage, timings = reply.usage, reply.timings  # type: ignore[attr-defined]
    answer = reply.text.replace("\n", " ")[:40]  # type: ignore[attr-defined]
    return (f"{i:>3}  {usage.prompt_tokens:>7}  {usage.cached_prompt_tokens:>7}  "
            f"{timings.time_to_first_token_ms:>9.1f}  {question[:34]:<34}  {answer}")


def main(args: argparse.Namespace) -> int:
    spec = ClusterSpec(model=resolve_model(args.model), decode_port=args.port)
    with LocalCluster(spec, progress=lambda line: print(line, flush=True)) as cluster:
        assert cluster.endpoints is not None
        print(f"cluster up: decode {cluster.endpoints.decode}, prefill {cluster.endpoints.prefill}")
        print(f"\n{'#':>3}  {'prompt':>7}  {'cached':>7}  {'ttft ms':>9}  {'question':<34}  answer")
        with open_channel(cluster.endpoints.decode) as channel:
            for i, question in enumerate(QUESTIONS, 1):
                request = build_request(Prompt(text=question, chat=True, system=SYSTEM_PROMPT,
                                               max_new_tokens=args.max_tokens))
                print(_row(i, question, generate(channel, request, timeout_s=300.0)), flush=True)
        print("\nrequests 2.. reuse the system prompt's blocks (cached > 0, lower time to first "
              "token): the prefill worker published them to the store, decode fetched them "
              "for request 1 and keeps them in its pool for later prompts")
    return 0
