"""The embedded story generator: a small offline TinyStories-like corpus for ``anetrain train`` without data.

Why: a first run must work without a download, and its loss curve must mean something. The corpus is simple
English children's stories (a named hero, a friend, a parent, a place, an object, a problem, dialogue, a
resolution and a moral), built from plot skeletons whose sentences are chosen among alternatives and filled
from word tables. That gives enough variety that a tiny model cannot memorise it, and enough regularity
(grammar, consistent names and pronouns, recurring plot shapes) that it can learn something in minutes.

How: a story is the shared opening paragraph followed by one of :data:`PLOTS`. Each paragraph is a tuple of
*beats*; each beat is a tuple of alternative sentence templates (an empty alternative means the beat may be
left out). Templates use :meth:`str.format` slots, listed in :func:`_slots`; every slot is drawn once per
story, so the hero keeps one name and one set of pronouns throughout. All randomness comes from one
``random.Random(seed)``: the same seed gives the same corpus byte for byte; nothing reads the clock or global
state, and no set order decides anything (dicts keep insertion order).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

from ..errors import AnetrainError
from ..fsutil import atomic_write

# ----------------------------------------------------------------------------------------------------------
# Word tables
# ----------------------------------------------------------------------------------------------------------

GIRL_NAMES = (
    "Lucy", "Mia", "Emma", "Anna", "Sara", "Zoe", "Ella", "Lena", "Nora", "Amy", "Kate", "Ruby", "Molly",
    "Sophie", "Chloe", "Hannah", "Julia", "Maya", "Olivia", "Grace", "Alice", "Clara", "Eva", "Tina",
    "Jenny", "Sally", "Polly", "Nina", "Leah", "Ivy",
)  # fmt: skip
BOY_NAMES = (
    "Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn", "Noah", "Luke", "Jake", "Owen", "Eli", "Adam",
    "Oscar", "Henry", "Theo", "Milo", "Ryan", "Alex", "Danny", "Billy", "Peter", "Jonah", "Carl", "Evan",
    "Hugo", "Kevin", "Simon", "Victor",
)  # fmt: skip
ANIMAL_NAMES = (
    "Pip", "Coco", "Benny", "Fluffy", "Nibbles", "Patch", "Rusty", "Bubbles", "Whiskers", "Tilly", "Bounce",
    "Dot", "Fuzzy", "Hoppy", "Snowy", "Pebble", "Ziggy", "Nutmeg", "Tiny", "Lulu", "Biscuit", "Wiggles",
    "Puddle", "Sparky", "Toffee", "Mo", "Bibi", "Skip", "Dash", "Goldie",
)  # fmt: skip
ALL_NAMES = GIRL_NAMES + BOY_NAMES + ANIMAL_NAMES

HERO_ADJECTIVES = (
    "little", "small", "curious", "kind", "brave", "shy", "cheerful", "clever", "playful", "gentle", "happy",
    "friendly", "funny", "sweet", "busy", "quiet",
)  # fmt: skip

NEW_FRIEND_ADJECTIVES = ("little", "small", "shy", "quiet", "young")  # fit "sitting all alone"

HUMAN_HOMES = (
    "in a small house near the park", "in a little yellow house on a hill",
    "in a big city with tall buildings", "in a quiet town by the sea", "on a farm with cows and chickens",
    "in a cozy cottage near the woods",
    "in a blue house on a busy street", "in a small village by a river",
)  # fmt: skip
# Animal kinds and the homes that suit them.
ANIMAL_HOMES = {
    "bunny": ("in a cozy hole under a big oak tree", "in a warm burrow at the edge of the forest"),
    "mouse": ("in a tiny hole in the wall of an old barn", "under the roots of an old tree"),
    "fox": ("in a warm den at the edge of the forest", "under a big rock on a green hill"),
    "hedgehog": ("under a pile of soft leaves in the garden", "in a little nest under a bush"),
    "squirrel": ("in a nest high up in a tall tree", "in a hollow tree in the forest"),
    "owl": ("in a hollow tree in the forest", "high up in an old pine tree"),
    "duck": ("by a quiet pond", "near a little river with clear water"),
    "frog": ("by a quiet pond full of lily pads", "near a little river with clear water"),
    "turtle": ("at the edge of a big lake", "by a quiet pond"),
    "pig": ("on a sunny farm", "in a red barn on a farm"),
    "lamb": ("on a sunny farm", "in a green field on a farm"),
    "puppy": ("in a warm house with a kind family", "in a little house with a big garden"),
    "kitten": ("in a warm house with a kind family", "in a little house with a big garden"),
    "bear": ("in a big cave in the forest", "in the woods near a tall mountain"),
}
ANIMAL_KINDS = tuple(ANIMAL_HOMES)

# Where the action happens: (place, preposition used with "the place").
HUMAN_PLACES = (
    ("park", "at"), ("playground", "at"), ("beach", "at"), ("garden", "in"), ("forest", "in"), ("lake", "by"),
    ("meadow", "in"), ("backyard", "in"), ("hill", "on"), ("field", "in"),
)  # fmt: skip
ANIMAL_PLACES = (
    ("forest", "in"), ("meadow", "in"), ("pond", "by"), ("field", "in"), ("garden", "in"), ("hill", "on"),
    ("river", "by"), ("woods", "in"),
)  # fmt: skip

# Parents (vocative, is female).
PARENTS = (
    ("mom", "Mom", True),
    ("dad", "Dad", False),
    ("grandma", "Grandma", True),
    ("grandpa", "Grandpa", False),
)

COLORS = ("red", "blue", "green", "yellow", "purple", "pink", "orange", "white", "brown", "shiny")
TOYS = (
    "ball", "kite", "teddy bear", "doll", "toy car", "toy boat", "hat", "scarf", "book", "drum", "truck",
    "robot", "toy train", "bucket", "whistle", "yo-yo",
)  # fmt: skip
STUCK_THINGS = ("kite", "ball", "hat", "balloon", "paper plane", "scarf")
LIKES = (
    "drawing pictures", "singing songs", "running in the grass", "looking at the stars", "reading books",
    "building towers with blocks", "dancing", "jumping in puddles", "playing hide and seek",
    "picking flowers", "watching the clouds", "playing with balls", "counting birds", "telling jokes",
    "making mud pies",
)  # fmt: skip
WHEN = (
    "One day", "One sunny day", "One sunny morning", "One bright afternoon", "One warm summer day",
    "One cool autumn morning", "One windy day", "One spring morning", "One Saturday morning", "One evening",
)  # fmt: skip
HAPPY = ("happy", "glad", "joyful")
SAD = ("sad", "upset", "unhappy")
PROUD = ("proud", "very proud", "proud and happy")

# (fear, what to do, brave act, what happened). Strings may use the hero's slots.
FEARS = (
    ("the big slide", "go down the big slide", "climbed up the steps and slid all the way down",
     "It was fast and fun!"),
    ("the dark", "sleep with the light off", "closed {his} eyes and listened to the quiet night",
     "Nothing bad happened, and soon {he} was fast asleep."),
    ("deep water", "swim in the lake", "stepped into the water and kicked {his} legs",
     "The water was cool and nice, and {he} could float!"),
    ("thunder", "watch the storm from the window", "sat by the window and counted the loud booms",
     "Soon the storm went away, and the sun came back out."),
    ("big dogs", "say hello to the big dog next door", "walked up slowly and said hello",
     "The big dog just wagged its tail and licked {his} hand."),
    ("bees", "walk through the flower garden", "walked slowly past the flowers and the busy bees",
     "The bees did not care about {him} at all. They only wanted the flowers."),
    ("the big waves", "play by the sea", "held on tight and jumped over a small wave",
     "The water was cold and splashy, and {he} laughed and laughed."),
    ("the tall tree house", "climb up to the tree house", "climbed up the ladder one step at a time",
     "From the top, {he} could see the whole world!"),
)  # fmt: skip
ADVICE = (
    "You are braver than you think. I will be right here with you.",
    "It is okay to be scared. Just try once, and I will hold your hand.",
    "Take a deep breath and go slowly. You can do it.",
)
SKILLS = (
    ("ride a bike", "riding a bike"), ("swim", "swimming"), ("jump rope", "jumping rope"),
    ("fly a kite", "flying a kite"), ("whistle", "whistling"), ("climb the big tree", "climbing trees"),
    ("skip stones on the water", "skipping stones"), ("catch a ball", "catching balls"),
    ("do a cartwheel", "doing cartwheels"), ("hop on one foot", "hopping on one foot"),
)  # fmt: skip
# (animal in need, what is wrong, what it cannot do, how it says goodbye).
CRITTERS = (
    ("bird", "hurt wing", "fly", "flew up into the sky and sang a happy song"),
    ("baby duck", "hurt leg", "walk", "waddled to the pond and swam away with a happy quack"),
    ("kitten", "sore paw", "walk", "purred and rubbed its soft head on {his} hand"),
    ("little frog", "hurt leg", "hop", "hopped into the pond with a big splash"),
    ("butterfly", "wet wing", "fly", "flew around {his} head three times and then flew away"),
    ("puppy", "thorn in its paw", "run", "wagged its tail and licked {his} nose"),
)  # fmt: skip
BREAKABLES = ("cup", "vase", "bowl", "plate", "lamp", "mug", "jar", "teapot")
# (helper, is female) for a hero lost in a crowd.
HELPERS = (
    ("kind lady", True), ("friendly man", False), ("old woman", True), ("tall man", False),
    ("nice shopkeeper", False), ("young woman", True),
)  # fmt: skip
CROWDS = ("busy market", "big fair", "crowded beach", "big store", "busy train station", "town parade")
# (gift, short name).
GIFTS = (
    ("a card with a big red heart on it", "card"), ("a picture of the whole family", "picture"),
    ("a crown made of paper and glitter", "crown"), ("a necklace of colorful beads", "necklace"),
    ("a little boat made of paper", "boat"), ("a bracelet of pretty shells", "bracelet"),
)  # fmt: skip
# (seed, what grew).
SEEDS = (
    ("sunflower", "tall yellow sunflowers"), ("pumpkin", "big orange pumpkins"),
    ("carrot", "sweet orange carrots"), ("tomato", "round red tomatoes"), ("bean", "long green beans"),
    ("strawberry", "sweet red strawberries"),
)  # fmt: skip
# (danger, why it is dangerous, what happened, how the hero was after).
DANGERS = (
    ("muddy pond", "The mud is very slippery", "slipped and fell right into the cold water", "wet and muddy"),
    ("big rocks", "They are wet and slippery", "slipped and scraped {his} knee", "hurt and scared"),
    ("thorny bushes", "The thorns are very sharp", "got scratched by the sharp thorns", "scratched and sore"),
    ("old bee hive", "The bees will get angry", "got stung on the nose by an angry bee", "sore and sad"),
    ("steep hill", "It is too steep", "slipped and rolled all the way down", "dirty and dizzy"),
    ("deep puddle", "It is deeper than it looks", "stepped in and sank up to {his} knees", "cold and wet"),
)  # fmt: skip
TREATS = ("cookies", "muffins", "cupcakes", "little cakes", "apple tarts", "banana muffins")
FOODS = (
    "sandwiches",
    "apples",
    "cookies",
    "grapes",
    "cheese",
    "crackers",
    "bananas",
    "carrot sticks",
    "berries",
)
GAMES = ("tag", "hide and seek", "catch", "follow the leader", "jump rope", "ring around the rosie")

# ----------------------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------------------
# Slots: hero {name} {a_hero} {kind} {he} {him} {his} {himself} {He} {His} {home} {likes}; friend {friend}
# {f_kind} {a_friend} {f_he} {f_him} {f_his} {F_he} {F_his}; parent {parent} {Parent} {p_he} {p_him} {p_his}
# {P_he}; helper {helper} {h_he} {h_him} {H_he}; and the story's {when} {place} {at_place} {thing} {a_thing}
# {noun} {color} {good} {sad} {proud} plus the per-plot slots of _slots().

OPENING = (
    (
        "Once upon a time, there was {a_hero} named {name}. {He} lived {home}.",
        "Once upon a time, {home}, there lived {a_hero} named {name}.",
        "There once was {a_hero} called {name} who lived {home}.",
        "{name} was {a_hero}. {He} lived {home}.",
        "Long ago, {home}, there lived {a_hero}. {His} name was {name}.",
    ),
    (
        "{He} loved {likes}.",
        "{name} liked {likes} more than anything.",
        "Every day, {name} liked {likes}.",
        "{His} favorite thing was {likes}.",
        "",
    ),
)

CLOSINGS = ("", "", "", "The end.")  # an optional last sentence, one story in four


@dataclass(frozen=True)
class Plot:
    """A plot skeleton: its name and its paragraphs (each a tuple of beats of alternative templates)."""

    name: str
    paragraphs: tuple[tuple[tuple[str, ...], ...], ...]


PLOTS = (
    Plot(
        "lost_toy",
        (
            (
                (
                    "{when}, {name} took {his} {thing} to the {place}.",
                    "{when}, {name} went to the {place} with {his} {thing}.",
                ),
                (
                    "{He} played with it all morning and had lots of fun.",
                    "{He} played and played until the sun was low in the sky.",
                ),
                (
                    "But when it was time to go home, the {noun} was gone!",
                    "Then {name} looked around, but {his} {noun} was not there anymore.",
                ),
            ),
            (
                (
                    '{name} felt very {sad}. "Where is my {noun}?" {he} cried.',
                    '"Oh no! I lost my {noun}!" said {name}. {He} felt {sad} and wanted to cry.',
                ),
                (
                    'Just then, {his} friend {friend} came by. "Don\'t be {sad}, {name}," said {friend}. '
                    '"I will help you look."',
                    '{His} friend {friend} saw that {name} was {sad}. "What is wrong?" asked {friend}. '
                    '"Let\'s look for it together."',
                ),
                (
                    "They looked behind the bushes, under the big rocks and in the tall grass.",
                    "They looked high and low, near and far.",
                ),
                (
                    "At last, {friend} saw something {color} on the ground. It was the {noun}!",
                    'Then {friend} shouted, "I found it!" The {thing} was hiding under a pile of leaves.',
                ),
            ),
            (
                (
                    '{name} was so {good}. "Thank you, {friend}!" {he} said, and gave {friend} a big hug.',
                    '{name} hugged {his} {noun} tight. "You are a good friend, {friend}," {he} said.',
                ),
                (
                    "From that day on, {name} always kept {his} {noun} close.",
                    "{name} learned that a good friend is always there to help.",
                    "{name} learned that it is easier to find something when a friend helps you look.",
                ),
            ),
        ),
    ),
    Plot(
        "sharing",
        (
            (
                (
                    "{when}, {name} got {a_thing} from {his} {parent}. It was the best {noun} in the world!",
                    "{name} had {a_thing}. {He} loved it very much and played with it every day.",
                ),
                ("{He} took it to the {place} to play.", "{name} took the {noun} outside to play."),
            ),
            (
                (
                    'There {he} met {his} friend {friend}. {friend} looked at the {noun} and said, "Can I '
                    "play "
                    'with your {noun} too?"',
                    'Soon {his} friend {friend} came by. "What a nice {noun}!" said {friend}. "Can I have a '
                    'turn?"',
                ),
                (
                    'But {name} held the {noun} tight. "No, it is mine!" {he} said.',
                    '"No," said {name}. "It is my {noun}. I want to play with it alone."',
                ),
                (
                    "{friend} felt {sad} and walked away. {F_he} sat down all alone under a tree.",
                    "{friend} looked at the ground and walked away slowly.",
                ),
                (
                    "Soon {name} was not having fun anymore. Playing alone was boring.",
                    "After a while, {name} felt lonely. The {noun} was not fun without a friend.",
                ),
            ),
            (
                (
                    '{name} walked over to {friend}. "I am sorry," {he} said. "Do you want to play with my '
                    '{noun}?"',
                    '{name} ran after {friend}. "Wait! You can have a turn," {he} said. "Let\'s play '
                    'together."',
                ),
                (
                    "{friend} smiled a big smile. The two friends played together until it was time to go "
                    "home.",
                    "{friend} smiled, and they took turns with the {noun} all afternoon.",
                ),
                (
                    "{name} learned that sharing makes playing more fun.",
                    "That day, {name} learned that it feels good to share.",
                    "{name} learned that toys are more fun when you share them with a friend.",
                ),
            ),
        ),
    ),
    Plot(
        "brave",
        (
            (
                (
                    "But {name} had one problem. {He} was scared of {fear}.",
                    "There was just one thing {name} did not like. {He} was afraid of {fear}.",
                ),
                (
                    "Every time {he} thought about it, {his} tummy felt funny.",
                    "Just thinking about it made {him} want to hide.",
                    "",
                ),
            ),
            (
                (
                    '{when}, {his} {parent} said, "Let\'s {face} today."',
                    "{when}, {name} and {his} {parent} wanted to {face}.",
                ),
                (
                    '{name} shook {his} head. "I am too scared," {he} said.',
                    '"I can\'t," said {name} in a small voice. "I am scared."',
                ),
                (
                    '{His} {parent} gave {him} a hug and said, "{advice}"',
                    '{His} {parent} held {his} hand and said, "{advice}"',
                ),
            ),
            (
                (
                    "{name} took a deep breath. Then {he} {brave_act}.",
                    "So {name} counted to three. Then {he} {brave_act}.",
                ),
                ("{outcome}",),
                ("{name} felt so {proud}!", '"I did it!" {name} shouted. {He} was so {proud}.'),
                (
                    "After that, {name} was not scared of {fear} anymore.",
                    "{name} learned that being brave means trying even when you feel scared.",
                    "{name} learned that things are often less scary when you try them.",
                ),
            ),
        ),
    ),
    Plot(
        "hurt_animal",
        (
            (
                (
                    "{when}, {name} was playing {at_place} when {he} heard a small sound.",
                    "{when}, {name} was walking {at_place}. Suddenly, {he} heard a soft cry.",
                ),
                (
                    "{He} looked down and saw a little {critter}. It had a {hurt} and could not {move}.",
                    "Under a bush there was a little {critter}. It had a {hurt}, and it could not {move}.",
                ),
                (
                    '"Poor little {critter}," said {name}. "I will help you."',
                    '{name} felt sorry for the {critter}. "Don\'t worry," {he} said softly. "I will take '
                    "care of "
                    'you."',
                ),
            ),
            (
                (
                    "{He} carefully picked it up and carried it home.",
                    "{name} gently picked up the {critter} and took it home.",
                ),
                (
                    "{His} {parent} helped {him} make a soft bed in a box.",
                    "{His} {parent} found a small box, and {name} put a soft blanket in it.",
                ),
                (
                    "Every day, {name} gave the {critter} food and water. {He} sang to it and kept it warm.",
                    "{name} gave the {critter} water and food, and {he} kept it warm every night.",
                ),
            ),
            (
                (
                    "After a few days, the {critter} was strong again. It could {move}!",
                    "Day by day, the {critter} got better. Soon it could {move} again.",
                ),
                (
                    "{name} took it outside and let it go. The {critter} {goodbye}.",
                    "{name} carried it back to where {he} had found it. The {critter} {goodbye}.",
                ),
                (
                    "{name} felt warm and {good} inside.",
                    '"Goodbye, little {critter}!" said {name} with a smile.',
                ),
                (
                    "{name} learned that being kind to animals is a good thing to do.",
                    "Helping a small animal made {name}'s heart feel full.",
                    "{name} learned that even the smallest friend needs help sometimes.",
                ),
            ),
        ),
    ),
    Plot(
        "keep_trying",
        (
            (
                (
                    "{name} wanted to learn to {skill}. {His} friend {friend} could already do it.",
                    "More than anything, {name} wanted to {skill}. {He} watched {his} friend {friend} do it "
                    "every day.",
                ),
                ("It looked like so much fun.", '"One day I will do it too," {name} said.', ""),
            ),
            (
                (
                    "{when}, {name} tried for the first time. But it was hard, and {he} fell down.",
                    "{when}, {name} tried and tried, but {he} could not do it.",
                ),
                (
                    '"I will never learn!" {name} said with a frown.',
                    "{name} felt {sad} and wanted to give up.",
                ),
                (
                    '{friend} sat down next to {name}. "Everyone falls at first," said {friend}. "Try again. '
                    'You can do it!"',
                    '"Don\'t give up," said {friend}. "I could not do it at first either. Just keep trying."',
                ),
            ),
            (
                (
                    "So {name} tried again, and again, and again.",
                    "Every day, {name} practiced a little more.",
                ),
                (
                    "Then one day, {he} did it! {name} could {skill}!",
                    "At last, {name} could {skill} all by {himself}!",
                ),
                (
                    '"Look at me!" {name} shouted. {friend} clapped and cheered.',
                    "{friend} cheered, and {name} laughed with joy.",
                ),
                (
                    "Now {name} loves {skill_ing}.",
                    "{name} learned that if you keep trying, you can do hard things.",
                    "{name} learned that practice helps you get better.",
                ),
            ),
        ),
    ),
    Plot(
        "honesty",
        (
            (
                (
                    "{when}, {name} was running and jumping around at home.",
                    "{when}, {name} was playing with a ball inside the house.",
                ),
                (
                    '{His} {parent} had said, "No playing rough inside!" But {name} forgot.',
                    "{name} knew {he} should be careful inside, but {he} was having too much fun.",
                ),
                (
                    "{He} bumped into the table, and {his} {parent}'s favorite {breakable} fell to the "
                    "floor. Crash!",
                    "Bump! The table shook, and {his} {parent}'s {breakable} fell down and broke.",
                ),
            ),
            (
                (
                    "{name} felt scared. What would {his} {parent} say?",
                    "{name} looked at the broken pieces. {His} heart beat fast.",
                ),
                (
                    "{He} thought about hiding the pieces under the rug.",
                    "{He} wanted to hide and say nothing.",
                ),
                (
                    "But then {name} remembered that hiding the truth is not right.",
                    "But {name} knew that hiding would not make it better.",
                ),
            ),
            (
                (
                    '{name} went to {his} {parent}. "I am sorry," {he} said in a small voice. "I broke your '
                    '{breakable}."',
                    '{name} found {his} {parent} and told the truth. "I was playing, and your {breakable} '
                    "broke. I "
                    'am sorry."',
                ),
                (
                    "{His} {parent} looked at the pieces, knelt down and gave {name} a hug.",
                    "{His} {parent} was quiet for a moment. Then {p_he} smiled a little.",
                ),
                (
                    '"Thank you for telling me the truth," said {his} {parent}. "Things can be fixed, but '
                    "the "
                    'truth is more important."',
                    '"I am glad you told me," said {his} {parent}. "Telling the truth is the right thing to '
                    'do."',
                ),
                ("Together they cleaned up the pieces.", ""),
                (
                    "{name} learned that it is always best to tell the truth.",
                    "From that day on, {name} was more careful inside the house.",
                ),
            ),
        ),
    ),
    Plot(
        "new_friend",
        (
            (
                ("{when}, {name} went to the {place}.", "{when}, {name} went out to play {at_place}."),
                (
                    "There {he} saw {a_friend} sitting all alone.",
                    "{He} saw {a_friend} that {he} had never seen before.",
                ),
                ("The {f_kind} looked {sad} and lonely.", ""),
            ),
            (
                (
                    '{name} walked over. "Hi, I am {name}," {he} said. "What is your name?"',
                    '{name} went up to the {f_kind}. "Hello! My name is {name}. Who are you?"',
                ),
                (
                    '"My name is {friend}," the {f_kind} said softly. "I am new here."',
                    '"I am {friend}," said the {f_kind} in a quiet voice. "I don\'t know anyone here."',
                ),
                (
                    '"Do you want to play with me?" asked {name}.',
                    '"You can play with me!" said {name} with a smile.',
                ),
                ("{friend} nodded, and a big smile came on {f_his} face.", "{friend} smiled and said yes."),
            ),
            (
                ("They played {game} until the sun went down.", "They played {game} and laughed a lot."),
                (
                    "From that day on, {name} and {friend} were best friends.",
                    "After that, {name} and {friend} played together every day.",
                ),
                (
                    "{name} learned that a kind hello can make a new friend.",
                    "{name} learned that being friendly is the best way to make friends.",
                    "",
                ),
            ),
        ),
    ),
    Plot(
        "rainy_picnic",
        (
            (
                (
                    "{when}, {name} and {his} {parent} made a plan. They wanted to have a picnic {at_place}.",
                    "{when}, {name}'s {parent} said, \"Let's have a picnic {at_place} today!\"",
                ),
                (
                    "{name} was so excited. {He} helped pack {food1} and {food2} in a big basket.",
                    "{name} jumped up and down. {He} put {food1} and {food2} in the picnic basket.",
                ),
            ),
            (
                (
                    "But just as they were ready to go, dark clouds filled the sky. Then it began to rain.",
                    "But then the sky turned gray, and big drops of rain began to fall.",
                ),
                ("Drip, drop, drip, drop. The rain came down hard.", ""),
                (
                    '{name} looked out the window and felt {sad}. "Now we can\'t have our picnic," {he} '
                    "said.",
                    '"Oh no," said {name}. "The rain ruined our picnic!"',
                ),
                (
                    '{His} {parent} thought for a moment. Then {p_he} smiled. "We can have a picnic inside!"',
                    '"Don\'t be {sad}," said {his} {parent}. "We can have our picnic on the floor!"',
                ),
            ),
            (
                (
                    "They put a blanket on the floor and sat on it. They ate {food1} and {food2} and told "
                    "funny "
                    "stories.",
                    "They spread a blanket on the floor and ate {food1} and {food2}.",
                ),
                ("Outside, the rain kept falling, but inside it was warm and cozy.", ""),
                ('"This is the best picnic ever!" said {name}.', "{name} laughed and laughed."),
                (
                    "{name} learned that a rainy day can still be a happy day.",
                    "Sometimes plans change, but you can still have fun.",
                ),
            ),
        ),
    ),
    Plot(
        "gift",
        (
            (
                (
                    "{when}, {name} remembered that it was {his} {parent}'s birthday.",
                    "{when}, {name} had a big idea. It was {his} {parent}'s birthday, and {he} wanted to "
                    "give a gift.",
                ),
                (
                    "{name} did not have any money to buy a present.",
                    "But {name} did not know what to give.",
                    "",
                ),
                (
                    "So {name} decided to make something. {He} made {gift}.",
                    "{He} got paper, glue and crayons, and {he} made {gift}.",
                ),
                ("{He} worked very hard on it.", "It took a long time, but {name} did not stop.", ""),
            ),
            (
                (
                    'When {his} {parent} came home, {name} gave the {gift_short} to {his} {parent}. "Happy '
                    'birthday!" {he} said.',
                    '{name} hid the {gift_short} behind {his} back. "Surprise! Happy birthday!" {he} said.',
                ),
                (
                    "{His} {parent}'s eyes filled with happy tears. \"This is the best gift I have ever "
                    'had," '
                    "said {his} {parent}.",
                    '{His} {parent} smiled a big smile. "I love it!" said {his} {parent}. "You made it all '
                    "by "
                    'yourself?"',
                ),
                ("{His} {parent} gave {name} a big hug.", ""),
                (
                    "{name} learned that the best gifts come from the heart.",
                    "{name} felt warm inside. Making someone happy felt even better than getting a gift.",
                ),
            ),
        ),
    ),
    Plot(
        "race",
        (
            (
                (
                    "{name} and {his} friend {friend} liked to run.",
                    "{name} had a friend named {friend}. They both loved to run fast.",
                ),
                (
                    '{when}, they had a race {at_place}. "Ready, set, go!" shouted {friend}.',
                    '{when}, {friend} said, "Let\'s race to the big tree!" "Yes!" said {name}.',
                ),
                ("They ran as fast as they could.", "They ran and ran, faster and faster."),
            ),
            (
                (
                    "{name} was in front, but then {he} tripped on a rock and fell down.",
                    "Then {name} tripped over a stick and fell on the ground.",
                ),
                ("{His} knee hurt, and {he} started to cry.", "{name} rubbed {his} knee. It hurt a lot."),
                (
                    "{friend} stopped running, came back and helped {name} stand up.",
                    "{friend} could have won, but {friend} turned around and ran back to help.",
                ),
                ('"Are you okay?" asked {friend}.', ""),
            ),
            (
                (
                    "Together they walked slowly to the finish line, holding hands.",
                    "They walked to the big tree together, side by side.",
                ),
                (
                    '"We both win!" said {friend}, and they laughed.',
                    '"Thank you," said {name}. "You are my best friend."',
                ),
                (
                    "{name} learned that being a good friend is more important than winning.",
                    "That day, {name} learned that helping a friend is better than winning a race.",
                ),
            ),
        ),
    ),
    Plot(
        "stuck",
        (
            (
                (
                    "{when}, {name} was playing with {his} {color} {stuck} {at_place}.",
                    "{when}, {name} took {his} {color} {stuck} to the {place}.",
                ),
                (
                    "Suddenly, a big wind came, and the {stuck} flew up into a tall tree!",
                    "{He} threw it up high, and oh no! The {stuck} got stuck in the branches of a tall tree.",
                ),
                (
                    "{name} jumped and jumped, but {he} could not reach it.",
                    "{name} stood on {his} toes and stretched, but the {stuck} was too high.",
                ),
                ('"What can I do?" said {name}.', ""),
            ),
            (
                (
                    "Then {name} had an idea. {He} ran to get {his} {parent}.",
                    "{name} did not give up. {He} went to ask {his} {parent} for help.",
                ),
                (
                    "{His} {parent} brought a long ladder and climbed up carefully.",
                    "{His} {parent} came with a long stick and reached up high.",
                ),
                (
                    "At last, {his} {parent} got the {stuck} down.",
                    "Slowly, the {stuck} came down from the tree.",
                ),
            ),
            (
                (
                    '"Thank you, {Parent}!" said {name}, holding the {stuck} tight.',
                    "{name} was so {good} to have {his} {stuck} back.",
                ),
                (
                    "{name} learned that it is okay to ask for help.",
                    "{name} learned that when a problem is too big, you can ask for help.",
                    "",
                ),
            ),
        ),
    ),
    Plot(
        "garden",
        (
            (
                (
                    "{when}, {name}'s {parent} gave {name} a small bag of {seed} seeds.",
                    "{when}, {name} found a little bag of {seed} seeds in the shed.",
                ),
                (
                    "{name} dug a little hole, put the seeds in and covered them with dirt.",
                    "{name} planted the seeds in a sunny spot in the garden.",
                ),
                ("Then {he} gave them some water.", "Then {he} watered them carefully."),
            ),
            (
                (
                    "The next morning, {name} ran outside to look. But nothing was there!",
                    "Every morning, {name} looked at the garden, but nothing grew.",
                ),
                ('"Why is nothing growing?" {name} asked.', '"Where are my plants?" said {name}.'),
                (
                    '{His} {parent} laughed softly. "Seeds need time," said {his} {parent}. "You have to be '
                    'patient."',
                    '"Be patient," said {his} {parent}. "Good things take time to grow."',
                ),
            ),
            (
                (
                    "So {name} waited. Every day {he} watered the seeds and pulled the weeds.",
                    "So {name} waited and waited, and {he} watered the garden every day.",
                ),
                (
                    "After many days, a little green sprout came up. Then it grew and grew.",
                    "One day, a tiny green sprout popped out of the dirt.",
                ),
                (
                    "At the end of the summer, there were {grown} in the garden!",
                    "Soon the garden was full of {grown}!",
                ),
                ("{name} was so {proud}.", ""),
                (
                    "{name} learned that good things take time.",
                    "{name} learned that being patient is worth it.",
                ),
            ),
        ),
    ),
    Plot(
        "lost_in_crowd",
        (
            (
                (
                    "{when}, {name} went to the {crowd} with {his} {parent}.",
                    "{when}, {name} and {his} {parent} went to the {crowd}.",
                ),
                (
                    "There were so many people and so many things to see.",
                    "It was very loud and full of people.",
                ),
                (
                    "{name} saw a stand with colorful balloons and walked over to look.",
                    "{name} stopped to watch a man make funny shapes out of balloons.",
                ),
                (
                    "When {name} turned around, {his} {parent} was gone!",
                    "But when {name} looked up, {his} {parent} was not there anymore!",
                ),
            ),
            (
                (
                    "{name} felt very scared. {He} looked left and right, but {he} could not see anyone "
                    "{he} knew.",
                    "{name}'s lip shook. {He} wanted to cry.",
                ),
                (
                    'Then {a_helper} came over. "Are you lost, little one?" asked the {helper} kindly.',
                    '{A_helper} saw that {name} was alone. "Can I help you?" asked the {helper}.',
                ),
                (
                    '"I can\'t find my {parent}," said {name}.',
                    '{name} nodded. "I lost my {parent}," {he} said.',
                ),
                (
                    'The {helper} held out a hand. "Let\'s look together," said the {helper}.',
                    '"Stay with me," said the {helper}. "We will find your {parent}."',
                ),
            ),
            (
                (
                    'Soon they heard a voice calling, "{name}! {name}!" It was {his} {parent}!',
                    "Soon {name} saw {his} {parent} in the crowd, looking everywhere.",
                ),
                (
                    "{name} ran to {his} {parent}, and they hugged for a long time.",
                    "{name} ran into {his} {parent}'s arms.",
                ),
                ('"Thank you," said {his} {parent} to the {helper}.', ""),
                (
                    "{name} learned to always stay close to {his} {parent} in busy places.",
                    "After that day, {name} always held {his} {parent}'s hand in a crowd.",
                ),
            ),
        ),
    ),
    Plot(
        "warning",
        (
            (
                (
                    "{when}, {name} went out to play {at_place}.",
                    "{when}, {name} wanted to go play {at_place}.",
                ),
                (
                    'Before {name} left, {his} {parent} said, "Do not go near the {danger}. {danger_why}."',
                    '{His} {parent} said, "Have fun, but stay away from the {danger}. {danger_why}."',
                ),
            ),
            (
                (
                    "But {name} wanted to see the {danger} up close.",
                    "But {name} was curious about the {danger}.",
                ),
                ('{He} thought, "Just one little look won\'t hurt."', ""),
                (
                    "{He} went closer and closer. Then {he} {mishap}!",
                    "{name} went nearer and nearer, and then {he} {mishap}!",
                ),
                ('"Help!" {name} cried.', '"Ouch!" cried {name}.'),
            ),
            (
                (
                    "{His} {parent} came running and helped {him} up.",
                    "{His} {parent} heard {name} and came quickly to help.",
                ),
                (
                    '{name} was {state}, and {he} felt very sorry. "I should have listened," {he} said.',
                    '{name} was {state}. "I am sorry I did not listen," {he} said quietly.',
                ),
                (
                    '{His} {parent} gave {him} a warm hug. "I am glad you are okay," said {his} {parent}.',
                    '"I am just glad you are safe," said {his} {parent}.',
                ),
                (
                    "{name} learned that it is important to listen to {his} {parent}.",
                    "From then on, {name} always listened when {his} {parent} said to be careful.",
                ),
            ),
        ),
    ),
    Plot(
        "tidy_room",
        (
            (
                (
                    "{name}'s room was very messy. There were toys, socks and books all over the floor.",
                    "{name} never cleaned {his} room. Toys and clothes were everywhere.",
                ),
                (
                    '{His} {parent} said, "Please clean your room." But {name} did not want to.',
                    '"Time to clean up," said {his} {parent}. But {name} said, "Cleaning is boring!"',
                ),
            ),
            (
                (
                    "{when}, {name} wanted to play with {his} {thing}. But {he} could not find it anywhere!",
                    "{when}, {name} looked for {his} {thing}, but it was lost in the mess.",
                ),
                ("{He} looked under the bed and behind the door, but there was too much mess.", ""),
                (
                    "So {name} began to clean. {He} put the books on the shelf and the socks in the basket.",
                    "So {name} started to pick things up, one by one.",
                ),
                ("{He} put {his} toys back in the big toy box.", ""),
                (
                    "And there, under a pile of clothes, was {his} {thing}!",
                    "At the very bottom of the mess, {he} found {his} {thing}!",
                ),
            ),
            (
                (
                    "{name} looked around. {His} room was clean, and now there was lots of space to play.",
                    "Now the room was neat and tidy.",
                ),
                ('{His} {parent} came in and smiled. "What a clean room!" said {his} {parent}.', ""),
                ("{name} felt {proud}.", ""),
                (
                    "{name} learned that keeping things tidy makes it easy to find what you need.",
                    "{name} learned that a tidy room is a happy room.",
                ),
            ),
        ),
    ),
    Plot(
        "baking",
        (
            (
                (
                    "{when}, {name} and {his} {parent} decided to bake {treat}.",
                    "{when}, {name}'s {parent} said, \"Let's bake {treat} today!\"",
                ),
                (
                    "They got flour, eggs, sugar and butter.",
                    "They took out a big bowl, flour, milk and eggs.",
                ),
                (
                    "{name} helped mix everything in a big bowl. Some flour got on {his} nose, and {he} "
                    "laughed.",
                    "{name} stirred and stirred until the dough was smooth.",
                ),
            ),
            (
                ("Then they put the {treat} in the hot oven.", "{His} {parent} put the {treat} in the oven."),
                (
                    '{name} wanted to eat them right away, but {his} {parent} said, "We have to wait until '
                    "they "
                    'are done."',
                    '"Are they ready yet?" asked {name}. "Not yet," said {his} {parent}. "Be patient."',
                ),
                ("Soon the whole house smelled sweet and warm.", ""),
                ("When the {treat} were ready, they were golden and soft.", "At last the {treat} were done."),
            ),
            (
                (
                    '{name} had an idea. "Let\'s share them with {friend}!" {he} said.',
                    '"Can we give some to my friend {friend}?" asked {name}.',
                ),
                (
                    "They brought a plate of {treat} to {friend}'s house.",
                    "They wrapped some {treat} and took them to {friend}.",
                ),
                (
                    '{friend} was so {good}. "Yum! These are the best {treat} ever!" said {friend}.',
                    '{friend} took a big bite and smiled. "Thank you, {name}!" said {friend}.',
                ),
                (
                    "{name} learned that sharing something you made makes it taste even better.",
                    "{name} learned that sharing makes everyone happy.",
                ),
            ),
        ),
    ),
)
PLOT_NAMES = tuple(plot.name for plot in PLOTS)

# ----------------------------------------------------------------------------------------------------------
# Logic
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Character:
    """Someone in a story: ``name`` ("Lucy", or the common noun for an unnamed one: "mom", "lady"),
    ``kind`` ("girl", "bunny", "grandpa", ...) and grammatical gender."""

    name: str
    kind: str
    female: bool

    def pronouns(self) -> dict[str, str]:
        he, him, his = ("she", "her", "her") if self.female else ("he", "him", "his")
        return {"he": he, "him": him, "his": his, "himself": him + "self"}


@dataclass(frozen=True)
class Story:
    """One generated story with its cast, so that tests can check names and pronouns."""

    text: str
    plot: str
    hero: Character
    others: tuple[Character, ...]  # friend, parent, helper (each may be unused by the plot)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _cast(rng: random.Random) -> tuple[Character, Character, Character, Character, bool]:
    """Draw the hero, a friend of the same sort (human or animal), a parent and a helper."""
    human = rng.random() < 0.6
    female = rng.random() < 0.5
    if human:
        hero = Character(rng.choice(GIRL_NAMES if female else BOY_NAMES), "girl" if female else "boy", female)
        f_female = rng.random() < 0.5
        names = GIRL_NAMES if f_female else BOY_NAMES
        friend_kind = "girl" if f_female else "boy"
    else:
        hero = Character(rng.choice(ANIMAL_NAMES), rng.choice(ANIMAL_KINDS), female)
        f_female = rng.random() < 0.5
        names = ANIMAL_NAMES
        friend_kind = rng.choice(ANIMAL_KINDS)
    friend_name = rng.choice(names)
    while friend_name == hero.name:
        friend_name = rng.choice(names)
    friend = Character(friend_name, friend_kind, f_female)
    p_word, _, p_female = rng.choice(PARENTS)
    parent = Character(p_word, p_word, p_female)
    h_phrase, h_female = rng.choice(HELPERS)
    helper = Character(h_phrase.split()[-1], h_phrase, h_female)
    return hero, friend, parent, helper, human


def _slots(rng: random.Random) -> tuple[dict[str, str], Character, tuple[Character, ...]]:
    """Draw every slot of one story once, so that names, pronouns and objects stay consistent."""
    hero, friend, parent, helper, human = _cast(rng)
    s: dict[str, str] = {}
    for prefix, who in (("", hero), ("f_", friend), ("p_", parent), ("h_", helper)):
        for key, word in who.pronouns().items():
            s[prefix + key] = word
            s[prefix.upper() + key if prefix else key.capitalize()] = word.capitalize()
    adjective = rng.choice(HERO_ADJECTIVES)
    s |= {
        "name": hero.name,
        "kind": hero.kind,
        "a_hero": _article(f"{adjective} {hero.kind}"),
        "home": rng.choice(HUMAN_HOMES if human else ANIMAL_HOMES[hero.kind]),
        "likes": rng.choice(LIKES),
        "friend": friend.name,
        "f_kind": friend.kind,
        "a_friend": _article(f"{rng.choice(NEW_FRIEND_ADJECTIVES)} {friend.kind}"),
        "parent": parent.name,
        "Parent": parent.name.capitalize(),
        "helper": helper.kind,
        "a_helper": _article(helper.kind),
        "A_helper": _article(helper.kind).capitalize(),
    }
    place, prep = rng.choice(HUMAN_PLACES if human else ANIMAL_PLACES)
    color, noun = rng.choice(COLORS), rng.choice(TOYS)
    s |= {
        "when": rng.choice(WHEN),
        "place": place,
        "at_place": f"{prep} the {place}",
        "color": color,
        "noun": noun,
        "thing": f"{color} {noun}",
        "a_thing": _article(f"{color} {noun}"),
        "good": rng.choice(HAPPY),
        "sad": rng.choice(SAD),
        "proud": rng.choice(PROUD),
        "stuck": rng.choice(STUCK_THINGS),
        "advice": rng.choice(ADVICE),
        "breakable": rng.choice(BREAKABLES),
        "crowd": rng.choice(CROWDS),
        "treat": rng.choice(TREATS),
        "game": rng.choice(GAMES),
    }
    s["fear"], s["face"], s["brave_act"], s["outcome"] = rng.choice(FEARS)
    s["skill"], s["skill_ing"] = rng.choice(SKILLS)
    s["critter"], s["hurt"], s["move"], s["goodbye"] = rng.choice(CRITTERS)
    s["gift"], s["gift_short"] = rng.choice(GIFTS)
    s["seed"], s["grown"] = rng.choice(SEEDS)
    s["danger"], s["danger_why"], s["mishap"], s["state"] = rng.choice(DANGERS)
    s["food1"], s["food2"] = rng.sample(FOODS, 2)
    for key in ("brave_act", "outcome", "goodbye", "mishap"):  # table entries that mention the hero
        s[key] = s[key].format_map(s)
    return s, hero, (friend, parent, helper)


def _render(
    paragraphs: tuple[tuple[tuple[str, ...], ...], ...], slots: dict[str, str], rng: random.Random
) -> str:
    lines = []
    for paragraph in paragraphs:
        sentences = [rng.choice(beat).format_map(slots) for beat in paragraph]
        lines.append(" ".join(s for s in sentences if s))
    return "\n".join(lines)


def generate_story(rng: random.Random) -> Story:
    """One story drawn with ``rng`` (advancing it)."""
    plot = rng.choice(PLOTS)
    slots, hero, others = _slots(rng)
    text = _render((OPENING, *plot.paragraphs), slots, rng)
    end = rng.choice(CLOSINGS)
    if end:
        text += " " + end
    return Story(text, plot.name, hero, others)


def generate_story_records(n: int, seed: int = 0) -> list[Story]:
    """``n`` stories with their casts; deterministic in ``seed``."""
    if n < 0:
        raise AnetrainError(f"the number of stories must be at least 0, got {n}")
    rng = random.Random(seed)
    return [generate_story(rng) for _ in range(n)]


def generate_stories(n: int, seed: int = 0) -> list[str]:
    """``n`` plain-ASCII stories of roughly 60-250 words; the same seed gives the same stories.

    Paragraphs inside a story are separated by a single newline; there are no blank lines inside a story.
    """
    return [story.text for story in generate_story_records(n, seed)]


def write_corpus(path: str | os.PathLike[str], n: int, seed: int = 0) -> int:
    """Write ``n`` stories to ``path`` atomically, separated by blank lines and ending with a newline.

    Returns the number of bytes written.
    """
    data = ("\n\n".join(generate_stories(n, seed)) + "\n").encode("ascii")
    with atomic_write(path) as f:
        f.write(data)
    return len(data)
