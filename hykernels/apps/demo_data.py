"""The demo's embedded data, written for this project: short multi-step arithmetic and unit
conversion problems. Steps are separated by a blank line (the default PRG step delimiter)."""

# (question, reasoning steps, gold answer): curated traces for reasoning distillation (RD).
RD_TRACES = [
    ("A train travels at 60 km per hour for 2.5 hours. How many km does it travel?",
     ["Distance is speed times time.", "60 * 2.5 = 150."], "150"),
    ("How many seconds are in 3 minutes and 20 seconds?",
     ["3 minutes is 3 * 60 = 180 seconds.", "180 + 20 = 200."], "200"),
    ("A shirt costs 40 dollars and is discounted by 25 percent. What is the new price in dollars?",
     ["25 percent of 40 is 0.25 * 40 = 10.", "40 - 10 = 30."], "30"),
    ("Tom has 3 boxes with 12 pencils each. He gives away 9 pencils. How many are left?",
     ["He has 3 * 12 = 36 pencils.", "36 - 9 = 27."], "27"),
    ("How many centimeters are in 4.2 meters?",
     ["One meter is 100 centimeters.", "4.2 * 100 = 420."], "420"),
    ("A recipe needs 250 grams of flour per cake. How many grams are needed for 6 cakes?",
     ["Multiply the amount per cake by the number of cakes.", "250 * 6 = 1500."], "1500"),
    ("What is 15 percent of 80, plus 8?",
     ["15 percent of 80 is 0.15 * 80 = 12.", "12 + 8 = 20."], "20"),
    ("A car uses 7 liters of fuel per 100 km. How many liters does it use for 300 km?",
     ["300 km is 3 times 100 km.", "3 * 7 = 21."], "21"),
    ("Anna reads 18 pages a day. How many pages does she read in 2 weeks?",
     ["2 weeks is 14 days.", "18 * 14 = 252."], "252"),
    ("How many minutes are in 2.5 hours?",
     ["One hour has 60 minutes.", "2.5 * 60 = 150."], "150"),
]

# Unlabelled queries for RLIF: the policy answers them itself, rewarded by its self-certainty.
RLIF_QUERIES = [
    "A bike travels at 12 km per hour for 3 hours. How many km does it travel?",
    "How many seconds are in 5 minutes?",
    "A book costs 20 dollars and is discounted by 10 percent. What is the new price in dollars?",
    "Sara has 4 bags with 6 apples each. She eats 5 apples. How many are left?",
]

PROMPT = "Question: {question}\nThink step by step, separating steps with a blank line.\n"
# The answer follows the cue after a space, encoded with it (" 150"), as BPE tokenizers split it.
CUE = "\nAnswer:"
