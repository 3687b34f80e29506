"""The fixed prompt set every server is driven with: short chat turns and long documents to summarise."""

SHORT_PROMPTS = [
    "What is the capital of France, and why is it famous?",
    "Write a short poem about the sea.",
    "Explain what a hash table is to a new programmer.",
    "Give me three ideas for a rainy Sunday afternoon.",
    "How do plants turn sunlight into energy?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "What are the benefits of regular exercise?",
    "Describe how a bicycle works.",
]

_PARAGRAPH = (
    "The history of computing stretches from mechanical calculators through vacuum tubes and transistors to the "
    "integrated circuits of today. Each generation made machines smaller, cheaper and faster, and each opened new "
    "uses: scientific simulation, business records, personal computers, networks that link the world, and phones "
    "that carry more power than the mainframes of fifty years ago. Software grew alongside the hardware, from "
    "hand-written machine code to high-level languages, operating systems, databases and the web. "
)


def _long_prompt(paragraphs: int, topic: str) -> str:
    return f"Read the following text and then {topic}.\n\n" + _PARAGRAPH * paragraphs


# About 500 and 1,000 prompt tokens: long enough that prefill matters, short enough for 4k contexts.
LONG_PROMPTS = [
    _long_prompt(6, "summarise it in one paragraph"),
    _long_prompt(12, "list its main points"),
]

# Three short turns for every long one, cycled in this order by every client.
PROMPTS = SHORT_PROMPTS[:3] + LONG_PROMPTS[:1] + SHORT_PROMPTS[3:6] + LONG_PROMPTS[1:] + SHORT_PROMPTS[6:]
