"""Everyday prompts for the positive-sentiment task on the real model, with a training and an
evaluation split that share no topic (so the evaluation measures steering on unseen subjects).

Each prompt asks for a short reply ("two sentences") about an everyday topic, through one of a few
templates. The lists are fixed and ordered, so the splits are the same on every machine.
"""

from __future__ import annotations

TEMPLATES = (
    "Write two sentences about {}.",
    "Describe {} in two sentences.",
    "In two sentences, tell me about {}.",
)

TOPICS = (
    "a visit to the dentist", "a rainy Monday morning", "waiting for a delayed train", "a traffic jam on the way home",
    "doing the laundry", "a power cut in the evening", "a job interview", "moving to a new apartment",
    "a long queue at the post office", "a broken umbrella", "a week of cold weather", "cleaning the kitchen",
    "a flat tyre on a bicycle", "a parent-teacher meeting", "filling in tax forms", "a noisy neighbour",
    "the first day at a new school", "a missed bus", "a crowded supermarket", "a hospital waiting room",
    "an old wooden bench in the park", "a cup of coffee that went cold", "a lost set of keys", "a long flight",
    "a grey winter afternoon", "a car that would not start", "a power nap at lunch", "a busy restaurant kitchen",
    "an exam the next morning", "repairing a leaking tap", "a shared office", "a dog that barks at night",
    "a trip to the hardware store", "a spreadsheet at work", "a cancelled concert", "a slow internet connection",
    "a visit to the bank", "an empty beach in autumn", "the night shift at a factory", "a neighbour's garden",
    "a late-night taxi ride", "a rainy football match", "buying a used car", "a library at closing time",
    "a school cafeteria lunch", "a small town on a Sunday", "a walk in the fog", "the end of a summer holiday",
    "an airport security line", "a sprained ankle", "a long meeting at work", "a dentist's drill",
    "writing a difficult email", "a crowded subway car", "a cheap hotel room", "a birthday spent alone",
    "the sound of a construction site", "a stack of unpaid bills", "a cracked phone screen", "a burnt dinner",
    "a camping trip in the rain", "learning to drive", "a visit to grandparents", "a quiet village church",
    "a heavy snowfall in the city", "a farmers' market", "the smell of a hospital corridor", "a job rejection letter",
    "an old photograph", "a power drill", "a train station at midnight", "a cold in the middle of summer",
    "a picnic interrupted by wasps", "the morning commute", "a mountain hike", "a museum on a weekday",
    "an empty office on Friday evening", "a thunderstorm at night", "a kitchen renovation", "a wedding rehearsal",
    "a broken washing machine", "the last day of school", "a fishing trip", "a night without sleep",
    "a ferry crossing in bad weather", "a dusty attic", "a second-hand bookshop", "a city bus in rush hour",
    "a gym on a Monday evening", "a hospital visit", "a garage sale", "a plumber's visit",
    "a misplaced passport", "a small bakery", "a foggy harbour", "the smell of fresh paint",
    "a parking ticket", "a school play", "a street market in the rain", "a parcel that never arrived",
    # evaluation topics from here on (never seen in training)
    "a visit to the optician", "a rainy Tuesday afternoon", "a delayed flight", "a road closed for repairs",
    "ironing shirts", "a leaking roof", "a performance review at work", "packing boxes for a move",
    "a queue at the pharmacy", "a torn raincoat", "a windy week in March", "washing the dishes",
    "a dead car battery", "a dentist appointment for a child", "renewing a driving licence", "a barking dog next door",
    "the first day at a new job", "a missed train connection", "a busy shopping mall", "an emergency room",
    "a bus stop in the rain", "a stale sandwich", "a forgotten password", "a long drive at night",
    "a cloudy Sunday", "a computer that keeps crashing", "a lunch break at the office", "a school bus ride",
    "a driving test", "fixing a squeaky door", "an open-plan office", "a cat that wakes you at dawn",
)

N_TRAIN_TOPICS = 100


def train_prompts() -> list[str]:
    """The training split: every template over the first 100 topics (300 prompts), ordered so that any
    prefix of 100 or more covers every training topic."""
    topics = TOPICS[:N_TRAIN_TOPICS]
    n = len(TEMPLATES)
    return [TEMPLATES[(i + k) % n].format(topic) for k in range(n) for i, topic in enumerate(topics)]


def eval_prompts(n: int | None = None) -> list[str]:
    """The evaluation split: two templates over each of the other 32 topics (64 prompts), or its first ``n``;
    the first 32 already cover every evaluation topic once."""
    topics = TOPICS[N_TRAIN_TOPICS:]
    prompts = [TEMPLATES[(i + k) % 2].format(topic) for k in range(2) for i, topic in enumerate(topics)]
    return prompts[:n] if n is not None else prompts
