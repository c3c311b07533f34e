"""A generated intent-classification dataset for the quickstart (no download, seeded).

Eight intents, each with ten utterance templates and slot values. Train and test use *disjoint*
templates (the first seven of each intent train, the last three test), so test accuracy measures
generalisation to phrasings the model never saw, not memorised sentences.
"""

from __future__ import annotations

import json
import os
import random

from lorakit.io.atomic import atomic_write_text

SLOTS: dict[str, list[str]] = {
    "city": ["Paris", "Tokyo", "Berlin", "Lima", "Cairo", "Oslo", "Denver", "Madrid", "Seoul", "Nairobi",
             "Toronto", "Hanoi", "Dublin", "Quito", "Perth"],
    "day": ["tomorrow", "on Friday", "next Monday", "this weekend", "on the 12th", "tonight", "on Sunday",
            "next week", "in two days", "on Tuesday morning"],
    "song": ["Bohemian Rhapsody", "some jazz", "the new Adele album", "lo-fi beats", "Beethoven's fifth",
             "my workout playlist", "classic rock", "something relaxing", "Daft Punk", "a podcast"],
    "time": ["6 am", "7:30", "noon", "half past eight", "5:15 pm", "9 o'clock", "quarter to seven", "10 pm",
             "6:45", "midnight", "4 pm", "twenty past nine"],
    "food": ["a large pizza", "two burritos", "pad thai", "sushi for four", "a veggie burger", "pho",
             "chicken curry", "a salad", "dumplings", "fish and chips"],
    "account": ["checking", "savings", "credit card", "joint", "business", "retirement", "student",
                "travel", "holiday", "pension", "brokerage", "household"],
    "lang": ["French", "Spanish", "Japanese", "German", "Swahili", "Korean", "Italian", "Portuguese"],
    "phrase": ["good morning", "where is the station", "thank you very much", "how much does it cost",
               "I am lost", "see you later", "nice to meet you"],
}

TEMPLATES: dict[str, list[str]] = {
    "book_flight": [
        "book me a flight to {city} {day}", "I need a plane ticket to {city}", "find flights to {city} {day}",
        "can you get me on a flight to {city}", "reserve a seat on the next plane to {city}",
        "I want to fly to {city} {day}", "search for airfare to {city}",
        "get me airline tickets for {city} {day}", "any cheap flights heading to {city}?",
        "I'd like to travel by air to {city} {day}",
    ],
    "weather": [
        "what's the weather in {city} {day}", "will it rain in {city} {day}", "how hot is it in {city}",
        "weather forecast for {city}", "do I need an umbrella in {city} {day}", "is it sunny in {city}",
        "temperature in {city} {day}", "should I expect snow in {city} {day}",
        "how cold will {city} be {day}", "tell me if storms are coming to {city}",
    ],
    "play_music": [
        "play {song}", "put on {song}", "I want to listen to {song}", "start playing {song} please",
        "can you play {song} in the living room", "queue up {song}", "turn on {song}",
        "let's hear {song}", "blast {song} on the speakers", "music please, {song}",
    ],
    "set_alarm": [
        "set an alarm for {time}", "wake me up at {time}", "alarm at {time} {day}",
        "I need to get up at {time}", "remind me to wake at {time}", "create an alarm for {time}",
        "set my alarm clock to {time} {day}", "make sure I'm awake by {time}",
        "ring at {time} to get me out of bed", "schedule a wake-up call for {time}",
    ],
    "order_food": [
        "order {food}", "I'd like to get {food} delivered", "can you order {food} for dinner",
        "get me {food} from the usual place", "I'm hungry, order {food}", "deliver {food} to my home",
        "place an order for {food}", "have {food} sent over for lunch",
        "I want takeout: {food}", "arrange delivery of {food} tonight",
    ],
    "check_balance": [
        "what's my {account} balance", "how much money is in my {account} account",
        "check my {account} account", "show me the balance of {account}", "how much do I have in {account}",
        "tell me my {account} funds", "balance for my {account} account please",
        "how much cash is left on my {account} account", "what are my {account} savings at",
        "give me the current amount in {account}",
    ],
    "translate": [
        "translate {phrase} into {lang}", "how do you say {phrase} in {lang}", "what is {phrase} in {lang}",
        "say {phrase} in {lang}", "{lang} for {phrase}", "can you translate {phrase} to {lang}",
        "I need {phrase} translated into {lang}", "what's the {lang} way to say {phrase}",
        "how would a {lang} speaker say {phrase}", "render {phrase} in {lang} for me",
    ],
    "cancel_booking": [
        "cancel my reservation {day}", "I want to cancel my booking in {city}", "call off my hotel in {city}",
        "please cancel the trip to {city}", "drop my booking for {day}", "cancel everything I booked {day}",
        "undo my reservation in {city}", "I won't make it, scrap the {city} booking",
        "terminate my hotel stay in {city} {day}", "get rid of my reservation for {day}",
    ],
}
INTENTS = tuple(TEMPLATES)
TRAIN_TEMPLATES = 7


def _fill(template: str, rng: random.Random) -> str:
    return template.format(**{k: rng.choice(v) for k, v in SLOTS.items() if "{" + k + "}" in template})


def _distinct(templates: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` different utterances from ``templates`` (fewer if the templates cannot make that many)."""
    seen: dict[str, None] = {}
    for _ in range(50 * n):  # bounded: a template set with few slot values may run out of new sentences
        if len(seen) == n:
            break
        seen.setdefault(_fill(rng.choice(templates), rng))
    return list(seen)


def make_intents(per_intent_train: int = 60, per_intent_test: int = 30, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of ``{"text": ..., "label": intent}``; test templates never train, and no
    utterance repeats (a duplicate would only weigh one sentence twice, and the data check flags it)."""
    rng = random.Random(seed)
    train, test = [], []
    for intent, templates in TEMPLATES.items():
        train += [{"text": t, "label": intent} for t in _distinct(templates[:TRAIN_TEMPLATES], per_intent_train, rng)]
        test += [{"text": t, "label": intent} for t in _distinct(templates[TRAIN_TEMPLATES:], per_intent_test, rng)]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def write_intents(out_dir: str, per_intent_train: int = 60, per_intent_test: int = 30, seed: int = 0) -> tuple[str, str]:
    """Write train.jsonl and test.jsonl into ``out_dir``; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "test"), make_intents(per_intent_train, per_intent_test, seed)):
        path = os.path.join(out_dir, f"{name}.jsonl")
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]
