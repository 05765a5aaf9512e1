"""The texts and the measure of quantization accuracy: a fixed English text, a held-out one, GPTQ's calibration text
(data/calibration.txt), and perplexity. Used by the accuracy tests (tests/model/quant/test_quant.py) and the spread
measurement (gptq_spread.py)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    'the rightful property of some one or other of their daughters. "My dear Mr. Bennet," said his lady to him '
    'one day, "have you heard that Netherfield Park is let at last?" Mr. Bennet replied that he had not. "But '
    'it is," returned she; "for Mrs. Long has just been here, and she told me all about it." Mr. Bennet made no '
    'answer. "Do you not want to know who has taken it?" cried his wife impatiently. "You want to tell me, and '
    'I have no objection to hearing it." This was invitation enough. "Why, my dear, you must know, Mrs. Long '
    "says that Netherfield is taken by a young man of large fortune from the north of England; that he came down "
    "on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. "
    "Morris immediately; that he is to take possession before Michaelmas, and some of his servants are to be in "
    'the house by the end of next week."'
)

# GPTQ's calibration text, disjoint from TEXT and HELDOUT: the openings of nineteen public-domain works, one a
# paragraph (Melville, Dickens x3, Carroll, the Declaration of Independence, Lincoln x2, Tolstoy tr. Garnett, Charlotte
# and Emily Bronte, Shelley, Stoker, Conan Doyle, Twain, Stevenson, Wells, Thoreau, Conrad; all published 1776-1901):
# ~2,950 tokens of prose of TEXT's kind (calibrating on the measured text itself measured +0.3% at g64: not done).
CALIBRATION = (Path(__file__).parent / "data" / "calibration.txt").read_text(encoding="utf-8")
# A second measured text (H. G. Wells, The War of the Worlds, 1898: public domain), written in after GPTQ's design
# was settled on TEXT, and used for no choice since: the check that calibration's gains are not TEXT's alone.
HELDOUT = (
    "No one would have believed in the last years of the nineteenth century that this world was being watched "
    "keenly and closely by intelligences greater than man's and yet as mortal as his own; that as men busied "
    "themselves about their various concerns they were scrutinised and studied, perhaps almost as narrowly as a man "
    "with a microscope might scrutinise the transient creatures that swarm and multiply in a drop of water. With "
    "infinite complacency men went to and fro over this globe about their little affairs, serene in their assurance "
    "of their empire over matter. It is possible that the infusoria under the microscope do the same. No one gave a "
    "thought to the older worlds of space as sources of human danger, or thought of them only to dismiss the idea "
    "of life upon them as impossible or improbable. It is curious to recall some of the mental habits of those "
    "departed days. At most terrestrial men fancied there might be other men upon Mars, perhaps inferior to "
    "themselves and ready to welcome a missionary enterprise. Yet across the gulf of space, minds that are to our "
    "minds as ours are to those of the beasts that perish, intellects vast and cool and unsympathetic, regarded this "
    "earth with envious eyes, and slowly and surely drew their plans against us."
)


def perplexity(llm, ids: list[int]) -> tuple[float, torch.Tensor]:
    """exp(mean negative log-likelihood) of ids[1:] given their prefixes, and the argmax token at each position."""
    llm.setup_cache(1, len(ids))
    logits = llm.forward(torch.tensor([ids], device=llm.device), 0)[0].double()
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:], device=llm.device)[:, None]).mean()
    return float(nll.exp()), logits.argmax(-1)
