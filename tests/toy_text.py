"""A tiny wikitext-2-raw-shaped corpus and the one-line-error check, for the text and tokenizer tests
(tests/test_text.py, tests/test_tokenizer.py) and tests of other modules."""
import os

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

TOY = {  # wikitext-2-raw's shape: heading lines, blank lines, " @-@ ", non-ASCII
    "train": " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a tactical role @-@ playing game .\n"
             " It was released in January 2011 in Japan .\n \n = = Gameplay = = \n \n The game is café-like — 😀 .\n",
    "valid": " \n = Homarus gammarus = \n \n Homarus gammarus is a species of lobster .\n",
    "test": " \n = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor .\n",
}


def toy_corpus(directory, names="wiki.{}.raw") -> str:
  """A tiny wikitext-2-raw-shaped corpus (train/valid/test) in `directory`; for tests of other modules too."""
  os.makedirs(directory, exist_ok=True)
  for split, body in TOY.items():
    with open(os.path.join(directory, names.format(split)), "w", encoding="utf-8") as f:
      f.write(body)
  return str(directory)


def one_line_error(excinfo, *needles):
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert str(n) in msg, (n, msg)
