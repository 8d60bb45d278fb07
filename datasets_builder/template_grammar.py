"""Offline template generator: a trait-conditioned phrase grammar (no language model needed).

It stands in for the LLM of the paper's synthesis pipeline so that the bank can be rebuilt without network
access. Each questioner trait steers a part of the text: the *personality* picks the opener, closer and
tone of the response; the *motivation* adds a sentence about why the questioner asks; the *proficiency*
chooses technical or lay wording. Sentence order and every phrase are sampled, so a "rewrite" is a fresh
sample under the same traits. Diversity comes from combinations, and the pipeline's ROUGE-L filter
(:mod:`datasets_builder.template_synthesis`) rejects near-duplicates.
"""

from __future__ import annotations

import numpy as np

from instructcell.tasks import get_task

from .templates import placeholders
from .traits import Questioner

OPENERS: dict[str, list[str]] = {
    "": ["", "", "", "", "Hi.", "Hello.", "Quick question.", "I need some help."],
    "polite": [
        "Could you please help me with something?",
        "I would be grateful for your help.",
        "Hello, I hope you can assist me.",
        "Excuse me, may I ask for a hand?",
        "Good day! Would you mind helping me?",
        "If it is not too much trouble, I have a request.",
        "Kindly allow me to ask you something.",
    ],
    "impatient": [
        "I'm in a hurry.",
        "No time to waste.",
        "Quick one, please.",
        "Let's be fast about this.",
        "I need this right away.",
        "Straight to the point:",
        "Make it snappy.",
    ],
    "curious": [
        "I've been wondering about something.",
        "Here's a puzzle I'm curious about.",
        "I'm intrigued by this one.",
        "Something caught my attention.",
        "I can't stop wondering about this.",
        "Let me ask you something interesting.",
    ],
    "skeptical": [
        "I'm not fully convinced by my own results.",
        "I have my doubts here.",
        "Let's see if you can get this right.",
        "I don't quite trust my earlier analysis.",
        "Prove me wrong if you can.",
        "I'm a bit suspicious of this data.",
    ],
    "anxious": [
        "I'm a little nervous about this.",
        "Sorry to bother you, I'm worried I messed up.",
        "I hope this isn't a silly question.",
        "My deadline is stressing me out.",
        "I really don't want to get this wrong.",
        "Please bear with me, I'm anxious.",
    ],
    "enthusiastic": [
        "This is so exciting!",
        "I love this part of the analysis!",
        "Great, let's do this!",
        "Okay, here comes the fun bit!",
        "I'm thrilled to try this!",
        "Wow, I can't wait to see the result!",
    ],
    "formal": [
        "Dear assistant,",
        "I hereby submit a request.",
        "Please consider the following request.",
        "To whom it may concern:",
        "I wish to make a formal inquiry.",
        "Allow me to present a task.",
    ],
    "humorous": [
        "Time to play cell detective!",
        "Here's a riddle for your silicon brain.",
        "Let's see if you're smarter than my microscope.",
        "Pop quiz, robot!",
        "Drumroll, please.",
        "Ready for a brain teaser?",
    ],
    "casual": [
        "Hey there!",
        "Yo!",
        "Hey, got a sec?",
        "So, here's the thing.",
        "Alright, check this out.",
        "Hiya!",
    ],
    "meticulous": [
        "I want this done carefully.",
        "Precision matters a lot to me here.",
        "Please be thorough.",
        "I've double-checked everything on my side.",
        "Accuracy is my top priority.",
        "Let's be rigorous.",
    ],
}
CLOSERS: dict[str, list[str]] = {
    "": ["", "", "", "", "", "Thanks.", "Thank you."],
    "polite": [
        "Thank you so much!",
        "Many thanks in advance.",
        "I really appreciate it.",
        "Thanks kindly.",
        "Much obliged.",
        "Your help means a lot.",
    ],
    "impatient": [
        "Quickly, please.",
        "ASAP.",
        "Hurry.",
        "Just the answer, please.",
        "Don't keep me waiting.",
        "Fast!",
    ],
    "curious": [
        "I'm eager to learn what you find.",
        "Can't wait to hear it.",
        "I'm really curious!",
        "Tell me what you see.",
        "Looking forward to the answer.",
    ],
    "skeptical": [
        "Let's see if you agree with me.",
        "Convince me.",
        "I'll double-check your answer anyway.",
        "We'll see.",
        "Show me you know your stuff.",
    ],
    "anxious": [
        "Fingers crossed.",
        "I hope that's okay.",
        "Sorry again for the trouble.",
        "Thanks, this calms me down.",
        "Please don't let me down.",
    ],
    "enthusiastic": [
        "Thanks a million!",
        "You're awesome!",
        "Can't wait!",
        "This is going to be great!",
        "Yay!",
    ],
    "formal": [
        "Respectfully yours.",
        "I thank you for your attention.",
        "With kind regards.",
        "Your assistance is appreciated.",
    ],
    "humorous": [
        "No pressure!",
        "Don't blow a fuse.",
        "The lab mice are counting on you.",
        "Good luck, genius!",
    ],
    "casual": ["Cheers!", "Thx!", "Cool, thanks.", "Appreciate it, mate.", "Catch you later."],
    "meticulous": [
        "Please double-check before answering.",
        "Be precise, please.",
        "Accuracy over speed.",
        "Make sure it's right.",
    ],
}
MOTIVATION_FRAMES = [
    "I'm {m}.",
    "Right now I am {m}.",
    "This is for a project where I'm {m}.",
    "Background: I am {m}.",
    "I'm in the middle of {m}.",
    "Some context: I'm {m}.",
    "I ask because I'm {m}.",
    "At the moment I'm {m}.",
    "For the record, I'm {m}.",
    "My goal here is {m}.",
    "I've been busy {m}.",
    "Currently I'm {m}.",
]
ASIDES: dict[str, list[str]] = {
    "high": [
        "The counts are raw UMIs after standard QC.",
        "I've already done doublet removal.",
        "Normalization is up to you.",
        "Assume the usual library-size differences.",
        "I work with scRNA-seq data every day.",
        "I'm comfortable with the technical details.",
        "The matrix has not been log-transformed.",
        "Batch effects should be minimal here.",
    ],
    "low": [
        "I'm new to single-cell stuff.",
        "Sorry if this is basic.",
        "I don't really understand gene expression yet.",
        "Please keep it simple.",
        "This is all new to me.",
        "I'm just a beginner.",
        "I'm not a biologist.",
        "I only started learning this last week.",
    ],
}

INPUT_SENTENCES: dict[str, list[str]] = {
    "high": [
        "Expression profile: {input}.",
        "Here is the count vector: {input}.",
        "The transcriptome is {input}.",
        "Input cell: {input}.",
        "Its gene expression profile is {input}.",
        "The single-cell profile follows: {input}.",
        "Raw counts: {input}.",
        "Profile to analyse: {input}.",
        "Data: {input}.",
        "The measured expression is {input}.",
    ],
    "low": [
        "Here's the data: {input}.",
        "This is what I got: {input}.",
        "The cell's numbers are {input}.",
        "Here it is: {input}.",
        "This is the cell: {input}.",
        "My data looks like this: {input}.",
        "I was given this: {input}.",
        "Take a look: {input}.",
    ],
}
METADATA_PHRASES: dict[str, list[str]] = {
    "species": [
        "from a {species}",
        "of {species} origin",
        "taken from {species}",
        "derived from a {species} sample",
        "collected in {species}",
        "of the species {species}",
    ],
    "tissue": [
        "from the {tissue}",
        "isolated from {tissue}",
        "sampled from {tissue}",
        "obtained from {tissue}",
        "harvested from {tissue}",
        "found in {tissue}",
    ],
    "sequencing_method": [
        "sequenced with {sequencing_method}",
        "profiled by {sequencing_method}",
        "measured using {sequencing_method}",
        "captured with {sequencing_method}",
        "assayed by {sequencing_method}",
        "read out on the {sequencing_method} platform",
    ],
}
METADATA_FRAMES = [
    "The cell is {items}.",
    "It was {items}.",
    "For context, the cell was {items}.",
    "Note that it is {items}.",
    "This sample was {items}.",
    "Metadata: {items}.",
    "Keep in mind it was {items}.",
    "Some details: {items}.",
    "The cell in question is {items}.",
    "FYI, it was {items}.",
]
METADATA_KEY_VALUE = {
    "species": ["Species: {species}", "Organism: {species}", "species = {species}"],
    "tissue": ["Tissue: {tissue}", "Tissue of origin: {tissue}", "tissue = {tissue}"],
    "sequencing_method": [
        "Method: {sequencing_method}",
        "Platform: {sequencing_method}",
        "technology = {sequencing_method}",
    ],
}
CHOICE_SENTENCES = [
    "Choose from: {choices}.",
    "The options are {choices}.",
    "Pick one of these labels: {choices}.",
    "Possible answers: {choices}.",
    "Answer with one of {choices}.",
    "Candidates: {choices}.",
    "Select among {choices}.",
    "It should be one of the following: {choices}.",
    "Limit your answer to {choices}.",
    "Your choices are {choices}.",
    "Only these are possible: {choices}.",
    "Options to consider: {choices}.",
]

RESPONSE_ACKS: dict[str, list[str]] = {
    "": ["", "", "Sure.", "Of course.", "Here you go.", "Done."],
    "polite": [
        "You're very welcome.",
        "Happy to help.",
        "It's my pleasure.",
        "Certainly, thank you for asking.",
    ],
    "impatient": ["", "Straight answer:", "Quickly then.", "Right away."],
    "curious": ["Good question!", "Interesting one!", "This was fun to look at.", "Great puzzle."],
    "skeptical": [
        "I understand your doubts.",
        "Fair enough, let's check.",
        "I see why you'd question it.",
        "Here's my careful take.",
    ],
    "anxious": [
        "Don't worry, it's not a silly question.",
        "No need to stress.",
        "Relax, I've got this.",
        "It's okay, we'll sort it out.",
    ],
    "enthusiastic": ["Exciting indeed!", "Love the energy!", "Great, here we go!", "Awesome!"],
    "formal": [
        "Thank you for your inquiry.",
        "Your request has been processed.",
        "Please find the result below.",
        "Certainly.",
    ],
    "humorous": [
        "Detective mode on!",
        "My silicon brain is up to it.",
        "Challenge accepted!",
        "Elementary, my dear scientist.",
    ],
    "casual": ["No problem!", "Sure thing!", "Gotcha.", "Easy."],
    "meticulous": [
        "I checked this carefully.",
        "After a thorough look:",
        "I reviewed the profile closely.",
        "Careful analysis done.",
    ],
}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


class GrammarGenerator:
    """Offline generator of instruction and chat-response templates (see module docstring).

    Parameters
    ----------
    metadata_probability
        Probability that each optional metadata placeholder (species, tissue, sequencing method) appears in an
        instruction (CTA, DSP); a task that requires them (CPCG) always has them.
    """

    def __init__(self, metadata_probability: float = 0.55) -> None:
        self.metadata_probability = metadata_probability

    def instruction(
        self, task: str, questioner: Questioner, with_choices: bool, rng: np.random.Generator
    ) -> str:
        """Sample an instruction template for ``task`` under ``questioner``'s traits."""
        spec = get_task(task)
        level = questioner.proficiency or _pick(rng, ["high", "low"])
        core = _pick(rng, spec.grammar.cores[level])
        middle = [core]
        if spec.input_cell and "{input}" not in core:
            middle.append(_pick(rng, INPUT_SENTENCES[level]))
        keys = [
            key
            for key in ("species", "tissue", "sequencing_method")
            if key in spec.required_placeholders
            or (key in spec.optional_placeholders and rng.random() < self.metadata_probability)
        ]
        if keys:
            middle.append(self._metadata_sentence(keys, rng))
        if questioner.motivation:
            middle.insert(
                int(rng.integers(len(middle) + 1)),
                _pick(rng, MOTIVATION_FRAMES).format(m=questioner.motivation),
            )
        if questioner.proficiency:
            middle.insert(int(rng.integers(len(middle) + 1)), _pick(rng, ASIDES[questioner.proficiency]))
        if with_choices:
            middle.insert(int(rng.integers(1, len(middle) + 1)), _pick(rng, CHOICE_SENTENCES))
        personality = questioner.personality or ""
        parts = [_pick(rng, OPENERS[personality]), *middle, _pick(rng, CLOSERS[personality])]
        return " ".join(_sentence(p) for p in parts if p)

    def _metadata_sentence(self, keys: list[str], rng: np.random.Generator) -> str:
        keys = [keys[i] for i in rng.permutation(len(keys))]
        if rng.random() < 0.2:
            return "; ".join(_pick(rng, METADATA_KEY_VALUE[k]) for k in keys) + "."
        items = [_pick(rng, METADATA_PHRASES[k]) for k in keys]
        joined = (
            items[0]
            if len(items) == 1
            else ", ".join(items[:-1]) + _pick(rng, [" and ", ", and ", ", "]) + items[-1]
        )
        return _pick(rng, METADATA_FRAMES).format(items=joined)

    def rewrite(self, text: str, task: str, questioner: Questioner, rng: np.random.Generator) -> str:
        """Rewrite = a fresh sample with the same traits (and the same choice of offering options)."""
        offered = get_task(task).offers_choices and "{choices}" in text
        return self.instruction(task, questioner, offered, rng)

    def response(self, task: str, instruction: str, questioner: Questioner, rng: np.random.Generator) -> str:
        """Chat response for ``instruction``: tone from the personality, detail from the proficiency.

        Metadata echoed in the response is limited to what the instruction itself mentions.
        """
        grammar = get_task(task).grammar
        mentioned = set(placeholders(instruction)) | {"output"}
        answer = _pick(rng, [a for a in grammar.answers if set(placeholders(a)) <= mentioned])
        ack = _pick(rng, RESPONSE_ACKS[questioner.personality or ""])
        parts = [ack, answer]
        if get_task(task).input_cell and questioner.personality != "impatient" and rng.random() < 0.5:
            parts.append(_pick(rng, grammar.notes[questioner.proficiency or "high"]))
        return " ".join(p for p in parts if p)
