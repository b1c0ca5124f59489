"""A chat app whose users share one long system prompt, with ChatOpenAI and with ChatParrot.

Every user talks to the same support assistant: one long system prompt (the shop's
policies), then that user's own history and new question, through one
``ChatPromptTemplate`` (system, ``MessagesPlaceholder`` history, user). A batch of
users' turns runs through the same chain code twice on the same model: ``ChatOpenAI``
on the service's OpenAI routes (LangChain's thread pool sends one request per user),
and ``ChatParrot``, whose ``batch`` sends every turn to the service as one graph. The
service's prefix cache computes the shared system prompt once either way; the table
shows how many prompt tokens each run read from it.

    pip install -e ".[client]"                                 # what it imports (embedded: serve too)
    python cookbook/langchain_shared_prompt_chat.py            # embedded service, default model
    python cookbook/langchain_shared_prompt_chat.py --url http://127.0.0.1:8000 --users 4
"""

from __future__ import annotations

import argparse
import time

from _services import served_model, service
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_openai import ChatOpenAI

from parrot.integrations.langchain import ChatParrot

SYSTEM_PROMPT = """\
You are the support assistant of Northwind Outfitters, an online shop for hiking and camping gear.
Answer the customer's question in two or three short sentences, politely and precisely, using only
the policies below. If the policies do not cover the question, say that a human agent will follow up
by email within one business day.

Shipping. Orders placed before 2 pm on a business day ship the same day. Standard shipping takes three
to five business days and is free for orders over 50 dollars; below that it costs 6 dollars. Express
shipping takes one to two business days and costs 15 dollars. We ship to the United States and Canada
only. Canadian orders may owe import duties, which the carrier collects on delivery. A tracking link is
emailed when the parcel leaves the warehouse; it can take a day before the carrier shows any scans.

Returns. Unused items in their original packaging can be returned within 60 days of delivery for a full
refund to the original payment method. Used items can be returned within 30 days for store credit if
they are clean and undamaged. Return shipping is free with the prepaid label from the order page;
refunds are issued within five business days after the return arrives. Sale items marked final sale,
gift cards, and personalized items cannot be returned.

Warranty. Tents, backpacks and sleeping bags carry a two-year warranty against defects in materials and
workmanship. Stoves and lanterns carry a one-year warranty. The warranty does not cover normal wear,
accidents, or damage from improper use or storage. To make a claim, the customer sends photos of the
defect and the order number to warranty@northwind.example; we repair or replace the item, at our choice.

Price match. If the same item is sold for less by a major retailer within 14 days of purchase, we refund
the difference once per item. Marketplace sellers, auctions and clearance prices do not count.

Rentals. Tents, stoves and backpacks can be rented for a weekend (Friday to Monday) at 20 percent of the
retail price. Rentals are picked up and returned at our Denver store only. A late return costs 10
dollars per day. Damage beyond normal wear is charged at the repair cost.

Accounts. Customers can change the shipping address of an order until it ships, from the order page.
Orders cannot be combined after checkout. Loyalty points are earned at one point per dollar and are
worth one cent each at checkout; they expire after 12 months without a purchase.
"""

CHATS = [
    (["Hi, I ordered a tent last week.", "Thanks for your order! How can I help with the tent?"],
     "It has a torn seam after two trips. What can I do?"),
    (["Hello.", "Hello! How can I help you today?"],
     "How long does express shipping take to Colorado?"),
    (["I bought boots on sale.", "I hope you enjoy them! What can I help with?"],
     "They are marked final sale but do not fit. Can I return them?"),
    (["Do you rent gear?", "Yes, we rent some gear for weekends. What do you need?"],
     "How much would a weekend stove rental cost if the stove is 80 dollars?"),
    (["I live in Toronto.", "Great, we ship to Canada. What would you like to know?"],
     "Will I pay anything extra when my order arrives?"),
    (["I saw a lower price.", "Thanks for telling us. Where did you see it?"],
     "A big outdoor retailer sells my backpack for 20 dollars less. I bought it 10 days ago."),
    (["My order has not moved.", "Sorry about that. When did you place it?"],
     "The tracking link shows no scans since yesterday. Is it lost?"),
    (["I have loyalty points.", "Nice! Do you have a question about them?"],
     "I have 900 points. How much are they worth?"),
]

PROMPT = ChatPromptTemplate.from_messages([
    ("system", SYSTEM_PROMPT),
    MessagesPlaceholder("history"),
    ("user", "{question}"),
])


def turns(num_users: int) -> list[dict]:
    """Each user's chain input: their history so far and their new question."""
    chats = (CHATS * (num_users // len(CHATS) + 1))[:num_users]
    inputs = []
    for i, (history, question) in enumerate(chats):
        said = [("user" if j % 2 == 0 else "assistant", text) for j, text in enumerate(history)]
        if i >= len(CHATS):  # a repeated chat is another user's: make the question their own
            question = f"{question} (asking again for order {1000 + i})"
        inputs.append({"history": said, "question": question})
    return inputs


def run(llm: BaseChatModel, inputs: list[dict]) -> tuple[list[AIMessage], float]:
    """Every user's reply and the batch's wall time, after a short warm-up call of its own."""
    llm.invoke("Say hello.", max_tokens=4)
    started = time.perf_counter()
    replies = (PROMPT | llm).batch(inputs)
    return replies, time.perf_counter() - started


def cached_share(replies: list[AIMessage]) -> str:
    prompt = cached = 0
    for reply in replies:
        usage = reply.usage_metadata
        if usage:
            prompt += usage["input_tokens"]
            cached += (usage.get("input_token_details") or {}).get("cache_read") or 0
    return f"{cached} of {prompt} prompt tokens from the prefix cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Parrot service (default: start one in this process)")
    parser.add_argument("--users", type=int, default=len(CHATS), help="how many users' turns in the batch")
    parser.add_argument("--max-tokens", type=int, default=48, help="the longest reply")
    args = parser.parse_args()
    inputs = turns(args.users)

    with service(args.url) as url:
        parrot = ChatParrot(base_url=url, temperature=0, max_tokens=args.max_tokens)
        parrot_replies, parrot_s = run(parrot, inputs)
    with service(args.url) as url:
        openai = ChatOpenAI(base_url=f"{url}/v1", api_key="none", model=served_model(url), temperature=0,
                            max_tokens=args.max_tokens)
        openai_replies, openai_s = run(openai, inputs)

    for turn, reply in zip(inputs, parrot_replies, strict=True):
        print(f"user: {turn['question']}\nassistant: {str(reply.content).strip()}\n")
    same = sum(p.content == o.content for p, o in zip(parrot_replies, openai_replies, strict=True))
    print(f"ChatOpenAI (OpenAI routes) wall time: {openai_s:.2f} s  ({cached_share(openai_replies)})")
    print(f"ChatParrot (one graph)     wall time: {parrot_s:.2f} s  ({cached_share(parrot_replies)})")
    print(f"speed-up: {openai_s / parrot_s:.2f}x")
    if args.url is not None:
        print("(one service for both runs: ChatOpenAI ran second, its prompts already in the prefix cache)")
    print(f"identical outputs: {same} of {len(inputs)} replies")


if __name__ == "__main__":
    main()
