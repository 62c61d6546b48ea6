"""Builds the project's instruction-tuning dataset: ``train.jsonl`` and ``test.jsonl``.

Run ``python data/instructions/build.py`` to (re)write both files next to this script, or
``python data/instructions/build.py --check`` to verify that the committed files equal what this
script produces (the test suite does the same). Output is deterministic: hand-written examples
are fixed Python data below, generated examples come from ``random.Random(SEED)``.

Every example is ``{"instruction", "input", "output", "category", "exact"}`` (Alpaca's three
fields plus a category and whether the task has a single right answer for exact-match
evaluation). ``math``, ``conversions`` and the "evaluate this expression" part of ``code`` are
generated with answers computed exactly (``fractions.Fraction`` / ``decimal``, ``datetime``,
Python's own ``eval``); everything else is written by hand. See README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

from llama_from_scratch.self_instruct import rouge_l_tokens

SEED = 20240917
TEST_FRACTION = 0.1
NEAR_DUPLICATE_ROUGE = 0.7
HERE = Path(__file__).resolve().parent
CATEGORIES = ("explain", "rewrite", "classify", "extract", "summarise", "math", "code", "conversions",
              "lists", "refusal")

# ---------------------------------------------------------------------------------------------
# Hand-written examples: (instruction, input, output, exact)
# ---------------------------------------------------------------------------------------------

EXPLAIN = [
    ("Explain what photosynthesis is in one or two sentences.", "", "Photosynthesis is the process by which plants, algae and some bacteria use light energy to turn carbon dioxide and water into glucose, releasing oxygen as a by-product.", False),
    ("What is a black hole?", "", "A black hole is a region of space where gravity is so strong that nothing, not even light, can escape once it crosses the boundary called the event horizon.", False),
    ("Briefly explain how a vaccine works.", "", "A vaccine shows the immune system a harmless piece or weakened form of a germ, so the body learns to recognise it and can fight the real infection quickly.", False),
    ("What does DNA stand for, and what does it do?", "", "DNA stands for deoxyribonucleic acid. It stores the genetic instructions that living things use to grow, function and reproduce.", False),
    ("Explain the difference between weather and climate.", "", "Weather is the state of the atmosphere over hours or days, such as rain or sunshine. Climate is the average pattern of weather in a region over many years.", False),
    ("What is inflation in economics?", "", "Inflation is the general rise in prices over time, which means each unit of money buys fewer goods and services.", False),
    ("Explain what a CPU does.", "", "The CPU (central processing unit) is the part of a computer that carries out program instructions: it does arithmetic, makes decisions and moves data.", False),
    ("What is the purpose of RAM in a computer?", "", "RAM is fast, temporary memory that holds the programs and data a computer is currently using. Its contents are lost when the power is turned off.", False),
    ("Describe what an API is to a beginner.", "", "An API (application programming interface) is a set of rules that lets one program ask another for data or services, like a menu that lists what you can order and how.", False),
    ("Why is the sky blue?", "", "Air molecules scatter sunlight, and they scatter short blue wavelengths much more than red ones, so blue light reaches our eyes from every part of the sky.", False),
    ("What causes the seasons on Earth?", "", "The tilt of Earth's axis. As Earth orbits the Sun, each hemisphere takes turns leaning towards it, getting more direct sunlight and longer days in its summer.", False),
    ("Explain gravity in simple terms.", "", "Gravity is the force that pulls objects with mass towards each other. It keeps us on the ground and keeps the Moon orbiting Earth.", False),
    ("What is machine learning?", "", "Machine learning is a branch of computer science in which programs learn patterns from data instead of following hand-written rules, and then use those patterns to make predictions.", False),
    ("How does a neural network work, in short?", "", "A neural network is made of layers of simple units that each compute a weighted sum of their inputs followed by a nonlinearity. Training adjusts the weights so that inputs map to the desired outputs.", False),
    ("Explain overfitting in machine learning.", "", "Overfitting happens when a model learns the training data too closely, including its noise, so it does well on that data but poorly on new, unseen examples.", False),
    ("What is a prime number?", "", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, such as 2, 3, 5 and 7.", False),
    ("State the Pythagorean theorem.", "", "In a right-angled triangle, the square of the hypotenuse equals the sum of the squares of the other two sides: a² + b² = c².", False),
    ("Explain what an atom is.", "", "An atom is the smallest unit of a chemical element. It has a nucleus of protons and neutrons surrounded by electrons.", False),
    ("What is the difference between a virus and a bacterium?", "", "Bacteria are single-celled living organisms that can reproduce on their own. Viruses are much smaller and can only reproduce inside the cells of a host.", False),
    ("What does a compiler do?", "", "A compiler translates source code written in a programming language into a lower-level form, such as machine code, that a computer can run.", False),
    ("Explain recursion in programming.", "", "Recursion is when a function calls itself to solve a smaller version of the same problem, stopping at a simple base case that it can answer directly.", False),
    ("What is a database index for?", "", "A database index is an extra data structure, often a B-tree, that lets the database find rows with a given value quickly instead of scanning the whole table.", False),
    ("Describe the job of an operating system.", "", "An operating system manages a computer's hardware and runs programs. It handles memory, files, devices and the scheduling of tasks, and gives applications a common interface.", False),
    ("What is supply and demand?", "", "Supply and demand describes how prices are set in a market: when demand rises or supply falls, the price tends to go up, and the reverse pushes it down.", False),
    ("What is the greenhouse effect?", "", "The greenhouse effect is the warming of Earth's surface because gases such as carbon dioxide and water vapour trap heat radiated from the ground instead of letting it escape to space.", False),
    ("Explain evaporation to a child.", "", "Evaporation is when a liquid slowly turns into a gas, like when a puddle disappears on a sunny day because the water goes into the air.", False),
    ("What is a metaphor?", "", "A metaphor is a figure of speech that describes something by saying it is something else, such as \"time is a thief\", to suggest a likeness.", False),
    ("How does a simile differ from a metaphor?", "", "A simile compares two things using \"like\" or \"as\" (\"brave as a lion\"), while a metaphor states the comparison directly (\"he is a lion\").", False),
    ("Explain what a noun is.", "", "A noun is a word that names a person, place, thing or idea, such as \"teacher\", \"London\", \"table\" or \"happiness\".", False),
    ("What is democracy?", "", "Democracy is a system of government in which power belongs to the people, who rule directly or by electing representatives in free and fair elections.", False),
    ("Explain the water cycle briefly.", "", "Water evaporates from oceans and land, condenses into clouds, falls as rain or snow, and flows back to the sea through rivers and groundwater, repeating the cycle.", False),
    ("What is an ecosystem?", "", "An ecosystem is a community of living things interacting with each other and with their physical environment, such as a forest, a lake or a coral reef.", False),
    ("Describe the job of the mitochondria in a cell.", "", "A mitochondrion releases energy from food through cellular respiration, producing the ATP that the cell uses as fuel.", False),
    ("Define electric current.", "", "An electric current is a flow of electric charge, usually electrons moving through a wire. It is measured in amperes.", False),
    ("What is the difference between speed and velocity?", "", "Speed tells how fast something moves. Velocity tells how fast and in which direction, so velocity is a vector while speed is a scalar.", False),
    ("What is a Git commit?", "", "A Git commit is a saved snapshot of changes in a repository, with a message, an author and a unique hash, so the project's history can be reviewed or restored.", False),
    ("Explain what HTTP is.", "", "HTTP (Hypertext Transfer Protocol) is the protocol web browsers and servers use to exchange requests and responses, such as asking for a web page and receiving it.", False),
    ("What is encryption?", "", "Encryption turns readable data into scrambled data using a key, so that only someone with the right key can turn it back and read it.", False),
    ("What is a tokenizer in natural language processing?", "", "A tokenizer splits text into tokens, such as words or pieces of words, and maps each one to a number so that a model can process the text.", False),
    ("Explain what a large language model is.", "", "A large language model is a neural network trained on huge amounts of text to predict the next token, which lets it generate text, answer questions and follow instructions.", False),
    ("What is a function in mathematics?", "", "A function is a rule that assigns exactly one output to each input; for example, f(x) = 2x doubles every number.", False),
    ("What does a derivative measure?", "", "A derivative measures how fast a function changes at a point: the slope of its curve there, or its instantaneous rate of change.", False),
    ("How do you calculate the mean of a set of numbers?", "", "Add the numbers and divide by how many there are. For 2, 4 and 9 the mean is 15 / 3 = 5.", False),
    ("What is the median of a list of numbers?", "", "The median is the middle value when the numbers are sorted. With an even count, it is the mean of the two middle values.", False),
    ("Explain probability with a coin example.", "", "Probability measures how likely an event is, as a number from 0 (impossible) to 1 (certain). A fair coin lands heads with probability 0.5.", False),
    ("Why do we have day and night?", "", "Earth spins on its axis about once every 24 hours. The side facing the Sun has day, and the side facing away has night.", False),
    ("What are tides caused by?", "", "Tides are caused mainly by the Moon's gravity, helped by the Sun's, pulling on Earth's oceans so that the sea level rises and falls about twice a day.", False),
    ("Define the term carbon footprint.", "", "A carbon footprint is the total amount of greenhouse gases, expressed as carbon dioxide, released by the activities of a person, a company or a product.", False),
    ("What is renewable energy?", "", "Renewable energy comes from sources that are naturally replenished, such as sunlight, wind, flowing water and geothermal heat.", False),
    ("What are the main jobs of a central bank?", "", "A central bank manages a country's money supply and interest rates, supervises banks and aims to keep prices and the financial system stable.", False),
    ("Explain compound interest.", "", "Compound interest is interest earned on both the original amount and the interest already added, so savings grow faster over time than with simple interest.", False),
    ("Describe the form of a haiku poem.", "", "A haiku is a short Japanese poem of three lines with five, seven and five syllables, often about nature or a season.", False),
    ("What is the role of the heart?", "", "The heart is a muscle that pumps blood around the body, carrying oxygen and nutrients to the tissues and taking carbon dioxide away.", False),
    ("Describe the immune system in one sentence.", "", "The immune system is the body's defence network of cells and organs that detects and destroys germs such as bacteria and viruses.", False),
    ("In one sentence, what is a spreadsheet?", "", "A spreadsheet is a program that organises data in rows and columns of cells and can calculate with it using formulas.", False),
    ("How does a refrigerator keep food cold?", "", "It pumps a refrigerant around a loop: the refrigerant evaporates inside, absorbing heat from the food compartment, and condenses at the back, releasing that heat into the room.", False),
    ("Why do some objects float in water?", "", "An object floats when it can push aside its own weight of water before it is fully submerged, so the upward buoyant force balances its weight.", False),
    ("Why do we need lungs?", "", "The lungs bring oxygen from the air into the blood and remove carbon dioxide from it, which we then breathe out.", False),
    ("Give a short definition of an algorithm.", "", "An algorithm is a finite, step-by-step set of instructions for solving a problem or carrying out a task.", False),
    ("What is cloud computing?", "", "Cloud computing means using computing resources such as servers, storage and software over the internet, paying for what you use instead of owning the hardware.", False),
    ("Explain the idea of opportunity cost.", "", "Opportunity cost is the value of the best alternative you give up when you make a choice, such as the wages lost by studying instead of working.", False),
    ("Define a verb and give examples.", "", "A verb is a word that describes an action, state or occurrence, such as \"run\", \"be\" or \"happen\".", False),
    ("Which quantity does a thermometer measure?", "", "A thermometer measures temperature, how hot or cold something is, usually in degrees Celsius or Fahrenheit.", False),
    ("How fast does light travel in a vacuum?", "", "Light travels at exactly 299,792,458 metres per second in a vacuum, about 300,000 kilometres per second.", False),
    ("What is attention in a transformer model?", "", "Attention lets each token build its representation as a weighted mix of the other tokens' values, with weights given by how well its query matches their keys.", False),
]

REWRITE = [
    ("Fix the grammar in this sentence.", "She don't like apples.", "She doesn't like apples.", False),
    ("Fix the grammar in this sentence.", "Me and him goes to the park every day.", "He and I go to the park every day.", False),
    ("Correct the spelling and grammar.", "Their going to there friends house tomorow.", "They're going to their friend's house tomorrow.", False),
    ("Fix the grammar in this sentence.", "The list of items are on the desk.", "The list of items is on the desk.", False),
    ("Fix the grammar in this sentence.", "I have went to Paris twice.", "I have gone to Paris twice.", False),
    ("Fix the grammar in this sentence.", "If I was you, I would apologise.", "If I were you, I would apologise.", False),
    ("Correct the errors in this sentence.", "Its a beautiful day and the dog is wagging it's tail.", "It's a beautiful day and the dog is wagging its tail.", False),
    ("Correct the errors in this sentence.", "There is less people here than yesterday.", "There are fewer people here than yesterday.", False),
    ("Correct the errors in this sentence.", "He runned to the store and buyed milk.", "He ran to the store and bought milk.", False),
    ("Correct the errors in this sentence.", "Between you and I, the plan won't work.", "Between you and me, the plan won't work.", False),
    ("Fix the punctuation and capitalisation.", "lets eat grandma", "Let's eat, Grandma.", False),
    ("Fix the punctuation and capitalisation.", "what time does the train leave i need to know", "What time does the train leave? I need to know.", False),
    ("Fix the grammar in this sentence.", "The childrens toys was everywhere.", "The children's toys were everywhere.", False),
    ("Rewrite this sentence in a formal tone.", "Hey, can you send me that report ASAP?", "Could you please send me the report at your earliest convenience?", False),
    ("Rewrite this sentence in a formal tone.", "We gotta fix this bug before the boss freaks out.", "We need to resolve this defect before it concerns management.", False),
    ("Make this message more formal.", "Thanks a bunch for the help yesterday, you're a lifesaver!", "Thank you very much for your assistance yesterday; it was greatly appreciated.", False),
    ("Make this message more formal.", "Sorry, can't make it to the meeting, something came up.", "I apologise, but I will be unable to attend the meeting due to an unforeseen commitment.", False),
    ("Rewrite this sentence in a formal tone.", "The new app is super cool and loads of people are using it.", "The new application is very popular and is used by a large number of people.", False),
    ("Rewrite this sentence in a formal tone.", "Your order's late 'cause our truck broke down.", "Your order has been delayed because our delivery vehicle broke down.", False),
    ("Turn this text message into a professional sentence.", "yo, the files r ready, grab em whenever", "The files are ready, and you may collect them at any time.", False),
    ("Make this message more formal.", "I dunno why the numbers don't add up.", "I am unsure why the figures do not reconcile.", False),
    ("Rewrite this sentence in a casual, friendly tone.", "We regret to inform you that the event has been cancelled.", "Sorry, but the event's been called off.", False),
    ("Rewrite this sentence in a casual, friendly tone.", "Please ensure that you arrive punctually at nine o'clock.", "Try to be there at nine on the dot!", False),
    ("Make this sentence sound more relaxed.", "Your request has been received and will be processed shortly.", "Got your request, we'll sort it out soon.", False),
    ("Make this sentence sound more relaxed.", "Attendance at the weekly meeting is mandatory for all staff.", "Everyone needs to come to the weekly meeting.", False),
    ("Rewrite this sentence in a casual, friendly tone.", "I would be delighted to accept your kind invitation.", "I'd love to come, thanks for asking!", False),
    ("Simplify this sentence for a young reader.", "The precipitation is expected to commence in the late afternoon.", "It will probably start raining late in the afternoon.", False),
    ("Simplify this sentence for a young reader.", "Photosynthesis enables plants to convert solar energy into chemical energy.", "Plants use sunlight to make their own food.", False),
    ("Rewrite this in plain English.", "The aforementioned individual was apprehended by law enforcement.", "The police arrested that person.", False),
    ("Rewrite this in plain English.", "Utilise the designated receptacle for the disposal of refuse.", "Put your rubbish in the bin.", False),
    ("Rewrite this in plain English.", "The meeting has been postponed to a later date that is yet to be determined.", "The meeting is delayed and the new date is not set yet.", False),
    ("Simplify this sentence.", "In the event that the alarm sounds, occupants must vacate the premises immediately.", "If the alarm goes off, leave the building at once.", False),
    ("Simplify this sentence.", "The medication should be administered twice daily subsequent to meals.", "Take the medicine twice a day after eating.", False),
    ("Simplify this sentence.", "Individuals possessing a valid ticket may proceed to the boarding area.", "People with a valid ticket can go to the gate.", False),
    ("Rewrite the sentence in the active voice.", "The cake was eaten by the children.", "The children ate the cake.", False),
    ("Rewrite the sentence in the active voice.", "The window was broken by a ball.", "A ball broke the window.", False),
    ("Rewrite the sentence in the active voice.", "The report will be written by Maria.", "Maria will write the report.", False),
    ("Rewrite the sentence in the passive voice.", "The chef cooked a delicious meal.", "A delicious meal was cooked by the chef.", False),
    ("Rewrite the sentence in the passive voice.", "Engineers are building a new bridge.", "A new bridge is being built by engineers.", False),
    ("Make this sentence more concise.", "At this point in time, we are not in a position to make a decision.", "We cannot decide yet.", False),
    ("Make this sentence more concise.", "Due to the fact that it was raining, the game was cancelled.", "The game was cancelled because of rain.", False),
    ("Make this sentence more concise.", "In my personal opinion, I think that the movie was really very good.", "I think the movie was very good.", False),
    ("Shorten this sentence without losing its meaning.", "The reason why he was late is because he missed the bus.", "He was late because he missed the bus.", False),
    ("Rewrite this request to be more polite.", "Give me the menu.", "Could I have the menu, please?", False),
    ("Rewrite this request to be more polite.", "Move your car, it's blocking my driveway.", "Excuse me, would you mind moving your car? It's blocking my driveway.", False),
    ("Rewrite this request to be more polite.", "Answer my email today.", "Could you please reply to my email today?", False),
    ("Change this sentence to the past tense.", "She walks to school and eats an apple.", "She walked to school and ate an apple.", False),
    ("Change this sentence to the past tense.", "They are swimming in the lake.", "They were swimming in the lake.", False),
    ("Change this sentence to the future tense.", "I finish my homework.", "I will finish my homework.", False),
    ("Rewrite this sentence in the first person.", "He loves hiking in the mountains.", "I love hiking in the mountains.", False),
    ("Rewrite the sentence with a more positive tone.", "The project was a disaster and nothing worked.", "The project faced many problems, and there is a lot we can learn from it.", False),
    ("Paraphrase this sentence.", "The store closes at nine in the evening.", "The shop shuts at 9 p.m.", False),
    ("Paraphrase this sentence.", "He was very tired after the long journey.", "The long trip left him exhausted.", False),
    ("Turn this statement into a yes/no question.", "The museum opens at ten.", "Does the museum open at ten?", False),
    ("Combine these two sentences into one.", "The dog barked. The mail carrier arrived.", "The dog barked when the mail carrier arrived.", False),
    ("Combine these two sentences into one.", "I was hungry. I made a sandwich.", "I was hungry, so I made a sandwich.", False),
    ("Rewrite the sentence to remove the jargon.", "Let's circle back and leverage our synergies going forward.", "Let's talk again later and work together more effectively.", False),
]

_SENT1 = "Classify the sentiment of this review as Positive, Negative or Neutral."
_SENT2 = "Is the sentiment of this text positive, negative or neutral? Answer with one word."
_TOPIC1 = "Classify the topic of this headline as Sports, Politics, Technology, Business or Science."
_TOPIC2 = "Which category does this news headline belong to: Sports, Politics, Technology, Business or Science?"
_SPAM = "Classify this message as Spam or Ham (a legitimate message)."
_LANG = "Which language is this sentence written in? Answer with one word."
_FACT = "Is this statement a fact or an opinion? Answer Fact or Opinion."
_ANIMAL = "Classify the animal as Mammal, Bird, Reptile, Fish or Amphibian."

CLASSIFY = [(instr, inp, out, True) for instr, inp, out in [
    (_SENT1, "The pasta was delicious and the staff were friendly.", "Positive"),
    (_SENT1, "The battery died after two days. Total waste of money.", "Negative"),
    (_SENT1, "Best concert I've been to in years!", "Positive"),
    (_SENT1, "The hotel room was dirty and the air conditioning was broken.", "Negative"),
    (_SENT1, "The package arrived on Tuesday.", "Neutral"),
    (_SENT1, "This book kept me up all night; I couldn't put it down.", "Positive"),
    (_SENT1, "The app crashes every time I open the camera.", "Negative"),
    (_SENT1, "The blender comes in three colours.", "Neutral"),
    (_SENT1, "Customer support solved my problem in five minutes. Impressive.", "Positive"),
    (_SENT1, "I waited an hour and my order was still wrong.", "Negative"),
    (_SENT1, "These headphones sound amazing for the price.", "Positive"),
    (_SENT2, "The movie was boring and far too long.", "Negative"),
    (_SENT2, "The meeting is scheduled for 3 pm in room 204.", "Neutral"),
    (_SENT2, "My kids loved the museum, and so did I.", "Positive"),
    (_SENT2, "The shirt shrank after the first wash.", "Negative"),
    (_SENT2, "The train departs from platform 6.", "Neutral"),
    (_SENT2, "What a lovely, sunny morning for a walk!", "Positive"),
    (_SENT2, "I'm really disappointed with the service today.", "Negative"),
    (_SENT2, "The report has twelve pages.", "Neutral"),
    (_SENT2, "The new update made my laptop much faster.", "Positive"),
    (_SENT2, "Terrible acting and a predictable plot.", "Negative"),
    (_SENT2, "The museum is closed on Mondays.", "Neutral"),
    (_TOPIC1, "Local team wins the championship after a dramatic penalty shootout", "Sports"),
    (_TOPIC1, "New smartphone chip promises twice the battery life", "Technology"),
    (_TOPIC1, "Parliament passes the budget after a late-night vote", "Politics"),
    (_TOPIC1, "Coffee chain reports record quarterly profits", "Business"),
    (_TOPIC1, "Astronomers discover a planet orbiting a nearby red dwarf", "Science"),
    (_TOPIC1, "Tennis star withdraws from the open with a wrist injury", "Sports"),
    (_TOPIC1, "Software update fixes security flaw in popular browser", "Technology"),
    (_TOPIC1, "Prime minister announces a snap general election", "Politics"),
    (_TOPIC2, "Car maker to cut 2,000 jobs as sales slow", "Business"),
    (_TOPIC2, "Researchers map the genome of an ancient wheat variety", "Science"),
    (_TOPIC2, "Marathon runner breaks the course record by two minutes", "Sports"),
    (_TOPIC2, "Senate committee questions the defence secretary over spending", "Politics"),
    (_TOPIC2, "Shares in the airline rise after a merger announcement", "Business"),
    (_TOPIC2, "Physicists measure the mass of the W boson with new precision", "Science"),
    (_TOPIC2, "Start-up unveils a robot vacuum that maps the house with lidar", "Technology"),
    (_SPAM, "Congratulations! You have won a $1,000 gift card. Click here to claim now!", "Spam"),
    (_SPAM, "Hi Tom, are we still meeting for lunch on Friday?", "Ham"),
    (_SPAM, "URGENT: your account will be suspended. Verify your password at this link.", "Spam"),
    (_SPAM, "The quarterly report is attached. Let me know if you have questions.", "Ham"),
    (_SPAM, "Earn $5000 a week from home, no experience needed!!!", "Spam"),
    (_SPAM, "Reminder: your dentist appointment is tomorrow at 10:30.", "Ham"),
    (_SPAM, "You are the lucky winner of a free cruise. Reply with your bank details.", "Spam"),
    (_SPAM, "Can you pick up milk on the way home?", "Ham"),
    (_SPAM, "Lose 10 kg in 7 days with this one weird pill!", "Spam"),
    (_SPAM, "The build failed on the main branch; I'm looking into it.", "Ham"),
    (_SPAM, "Cheap watches, 90% off, limited offer, buy now!", "Spam"),
    (_SPAM, "Thanks for the interview today. We will be in touch next week.", "Ham"),
    (_LANG, "Où est la gare, s'il vous plaît ?", "French"),
    (_LANG, "¿Dónde está la biblioteca?", "Spanish"),
    (_LANG, "Ich habe heute keine Zeit.", "German"),
    (_LANG, "Mi piace molto la pizza.", "Italian"),
    (_LANG, "Eu gosto de ler livros.", "Portuguese"),
    (_LANG, "Ik woon in Amsterdam.", "Dutch"),
    (_LANG, "The weather is lovely today.", "English"),
    (_LANG, "Je voudrais un café, merci.", "French"),
    (_LANG, "Hoy hace mucho calor.", "Spanish"),
    (_LANG, "Wir fahren morgen nach Berlin.", "German"),
    (_LANG, "Dove si trova il museo?", "Italian"),
    (_LANG, "Obrigado pela ajuda.", "Portuguese"),
    (_LANG, "Hij drinkt elke ochtend koffie.", "Dutch"),
    (_FACT, "Water boils at 100 °C at sea level.", "Fact"),
    (_FACT, "Summer is the best season.", "Opinion"),
    (_FACT, "Paris is the capital of France.", "Fact"),
    (_FACT, "Jazz is more interesting than pop music.", "Opinion"),
    (_FACT, "The Pacific is the largest ocean on Earth.", "Fact"),
    (_FACT, "Cats make better pets than dogs.", "Opinion"),
    (_ANIMAL, "Dolphin", "Mammal"),
    (_ANIMAL, "Penguin", "Bird"),
    (_ANIMAL, "Crocodile", "Reptile"),
    (_ANIMAL, "Salmon", "Fish"),
    (_ANIMAL, "Frog", "Amphibian"),
    (_ANIMAL, "Bat", "Mammal"),
    (_ANIMAL, "Shark", "Fish"),
    (_ANIMAL, "Salamander", "Amphibian"),
    (_ANIMAL, "Tortoise", "Reptile"),
    (_ANIMAL, "Ostrich", "Bird"),
]]

_NAMES = "Extract all the people's names from the text, separated by commas. Answer None if there are none."
_DATES = "List every date mentioned in the text, separated by semicolons."
_NUMS = "Extract all the numbers from the text, in order, separated by commas."
_EMAILS = "Extract the email addresses from the text, separated by commas. Answer None if there are none."

EXTRACT = [(instr, inp, out, True) for instr, inp, out in [
    (_NAMES, "Yesterday Maria Lopez met John Smith at the airport.", "Maria Lopez, John Smith"),
    (_NAMES, "The award went to Priya Patel, while Tom Becker was named runner-up.", "Priya Patel, Tom Becker"),
    (_NAMES, "After the lecture, Alan Reed answered questions from Sofia and Liam.", "Alan Reed, Sofia, Liam"),
    (_NAMES, "Hannah and her brother Oliver visited their grandmother, Rose Miller.", "Hannah, Oliver, Rose Miller"),
    (_NAMES, "The contract was signed by Kenji Watanabe on behalf of the company.", "Kenji Watanabe"),
    (_NAMES, "Nobody came to the meeting on Friday because of the snow.", "None"),
    (_DATES, "The conference runs from 12 March 2024 to 15 March 2024.", "12 March 2024; 15 March 2024"),
    (_DATES, "Payment is due on 2023-11-30, and the next invoice goes out on 2023-12-15.", "2023-11-30; 2023-12-15"),
    (_DATES, "She was born on July 4, 1990 and moved to Canada on June 1, 2015.", "July 4, 1990; June 1, 2015"),
    (_DATES, "The shop will be closed from 24 December until 2 January.", "24 December; 2 January"),
    (_DATES, "The deadline for applications is 31/01/2025.", "31/01/2025"),
    (_DATES, "The meeting was moved from 3 May to 10 May.", "3 May; 10 May"),
    (_NUMS, "The team scored 3 goals in the first half and 2 in the second.", "3, 2"),
    (_NUMS, "The recipe needs 250 grams of flour, 2 eggs and 100 ml of milk.", "250, 2, 100"),
    (_NUMS, "Tickets cost 15 dollars for adults and 8 for children.", "15, 8"),
    (_NUMS, "Our office has 42 employees on 3 floors.", "42, 3"),
    (_NUMS, "The bridge is 1.5 kilometres long and 45 metres high.", "1.5, 45"),
    (_EMAILS, "Contact us at support@example.com or sales@example.org for more information.", "support@example.com, sales@example.org"),
    (_EMAILS, "Please send the form to anna.k@uni.edu by Friday.", "anna.k@uni.edu"),
    (_EMAILS, "My work email is j.doe@company.co.uk but I also use jd1985@mail.net.", "j.doe@company.co.uk, jd1985@mail.net"),
    (_EMAILS, "Questions? Write to help@shop.example at any time.", "help@shop.example"),
    (_EMAILS, "Call us on 555-0142; we do not answer email.", "None"),
    ("Extract the phone number from the text.", "For bookings call 020 7946 0958 between 9 and 5.", "020 7946 0958"),
    ("Extract the phone number from the text.", "You can reach the front desk at +1 555 123 4567.", "+1 555 123 4567"),
    ("List the cities mentioned in the text, separated by commas.", "We flew from Madrid to Tokyo with a stop in Dubai.", "Madrid, Tokyo, Dubai"),
    ("List the cities mentioned in the text, separated by commas.", "The band will play in Oslo, Vienna and Lisbon this summer.", "Oslo, Vienna, Lisbon"),
    ("List the cities mentioned in the text, separated by commas.", "She grew up in Nairobi before studying in Toronto.", "Nairobi, Toronto"),
    ("Extract the price from the text.", "The jacket is on sale for $59.99 this week only.", "$59.99"),
    ("Extract the price from the text.", "A monthly subscription costs €12.50.", "€12.50"),
    ("Extract the names of the companies mentioned in the text.", "Apple and Microsoft both reported strong earnings, while Intel struggled.", "Apple, Microsoft, Intel"),
    ("Extract the names of the companies mentioned in the text.", "She left Google in 2019 to join a small start-up called Brightpath.", "Google, Brightpath"),
    ("Extract all the times mentioned in the text.", "The film starts at 7:45 pm, so let's meet at 7:15 pm.", "7:45 pm, 7:15 pm"),
    ("Extract all the times mentioned in the text.", "Breakfast is served from 06:30 to 10:00.", "06:30, 10:00"),
    ("Extract the product and the quantity from the order, as 'product: quantity'.", "I'd like to order 3 blue notebooks, please.", "blue notebooks: 3"),
    ("Extract the product and the quantity from the order, as 'product: quantity'.", "Please send 12 AA batteries to the office.", "AA batteries: 12"),
    ("Extract the URL from the text.", "Read the full guide at https://docs.example.com/start before you begin.", "https://docs.example.com/start"),
    ("Extract the URL from the text.", "The slides are available at https://example.org/talks/2024 now.", "https://example.org/talks/2024"),
    ("Extract the hashtags from this post.", "Great run this morning! #fitness #running #motivation", "#fitness, #running, #motivation"),
    ("Extract the hashtags from this post.", "Finally finished my first painting #art", "#art"),
    ("According to the text, how old is Lena?", "Lena is 34 years old and works as a nurse in Leeds.", "34"),
    ("According to the text, what colour was the car?", "The thief escaped in a red car heading north on Elm Street.", "Red"),
    ("According to the passage, when was the bridge completed?", "Construction of the bridge began in 1932 and was completed in 1937.", "1937"),
    ("According to the passage, who wrote the letter?", "The letter, written by Captain Hayes, arrived two weeks late.", "Captain Hayes"),
    ("From the text, how many bedrooms does the house have?", "The house has four bedrooms, two bathrooms and a large garden.", "Four"),
    ("From the text, what is the dog's name?", "Our dog, Biscuit, loves chasing the neighbour's cat.", "Biscuit"),
    ("Extract the ingredients from the recipe, separated by commas.", "Mix flour, sugar and butter, then add two eggs and a pinch of salt.", "flour, sugar, butter, eggs, salt"),
    ("Extract the ingredients from the recipe, separated by commas.", "Fry the onions in olive oil, add garlic and tomatoes, and season with basil.", "onions, olive oil, garlic, tomatoes, basil"),
    ("Extract the percentage from the text.", "Unemployment fell to 4.2% last quarter.", "4.2%"),
    ("Extract the years mentioned in the text.", "The company was founded in 1998 and went public in 2007.", "1998, 2007"),
    ("Extract the years mentioned in the text.", "The war lasted from 1914 to 1918.", "1914, 1918"),
    ("Extract the names of the countries in the text.", "Exports to Brazil rose, while trade with Japan and Kenya fell.", "Brazil, Japan, Kenya"),
    ("Extract the names of the countries in the text.", "The river flows through Germany, Austria and Hungary.", "Germany, Austria, Hungary"),
    ("Find the email address and the phone number in the text.", "Reach Sam at sam.ortiz@example.net or 555-0199.", "Email: sam.ortiz@example.net; phone: 555-0199"),
]]

_SUM1 = "Summarise the text in one sentence."
_SUM2 = "Write a one-sentence summary of this passage."
SUMMARISE = [(instr, inp, out, False) for instr, inp, out in [
    (_SUM1, "The city council voted on Tuesday to turn the old railway line into a cycling and walking path. The project will cost about two million pounds and is expected to open next spring. Supporters say it will reduce traffic and give residents a safe place to exercise.", "The council approved a two-million-pound plan to turn the old railway line into a cycling and walking path that opens next spring."),
    (_SUM2, "Scientists studying a coral reef found that areas protected from fishing had three times as many fish as nearby unprotected areas. The researchers say marine reserves help fish populations recover and can also benefit fishermen, because fish spill over into surrounding waters.", "Protected reef areas had three times more fish, suggesting marine reserves help fish populations and nearby fisheries."),
    (_SUM1, "Maya had practised the piano for months for the competition. On the day, her hands shook and she missed a note in the first bar. She took a breath, kept going, and finished the piece beautifully, winning second place.", "Despite a nervous start, Maya recovered and won second place in the piano competition."),
    (_SUM2, "Regular exercise improves heart health, strengthens muscles and bones, and can lift mood by releasing endorphins. Experts recommend at least 150 minutes of moderate activity each week, such as brisk walking or cycling.", "Regular exercise, ideally 150 minutes of moderate activity a week, benefits the heart, muscles, bones and mood."),
    (_SUM1, "The company announced that from next month employees may work from home up to three days a week. Managers will agree schedules with their teams, and the office will remain open every weekday for those who prefer to come in.", "From next month employees may work from home up to three days a week."),
    (_SUM2, "A heavy storm swept across the region overnight, bringing down trees and power lines. Around 20,000 homes lost electricity, and several roads were closed. Crews are working to restore power, which should be back by this evening.", "An overnight storm left about 20,000 homes without power and closed roads, with electricity expected back by evening."),
    (_SUM1, "Honeybees tell each other where food is with a 'waggle dance'. The angle of the dance shows the direction relative to the sun, and the length of the waggle shows the distance to the flowers.", "Honeybees use a waggle dance whose angle and length tell other bees the direction and distance of food."),
    (_SUM2, "The museum's new exhibition brings together more than 200 objects from ancient Egypt, including jewellery, tools and a painted coffin. Many of the items have never been shown to the public before. The exhibition runs until the end of August.", "The museum is showing over 200 ancient Egyptian objects, many never displayed before, until the end of August."),
    (_SUM1, "Drinking enough water helps the body regulate temperature, keeps joints lubricated and supports digestion. Thirst, dark urine and headaches can be signs of dehydration.", "Staying hydrated supports temperature control, joints and digestion, and thirst or headaches can signal dehydration."),
    (_SUM2, "After years of decline, the town's high street is busy again. Empty shops have been taken over by independent cafés, a bookshop and a weekly market, helped by lower rents offered by the council.", "Lower council rents have helped independent businesses revive the town's once-declining high street."),
    (_SUM1, "The software update, released on Monday, fixes a bug that caused some phones to drain their batteries overnight. Users are advised to install it as soon as possible through the settings menu.", "Monday's update fixes a battery-draining bug, and users should install it soon."),
    (_SUM2, "Researchers trained a small language model on children's stories and found it could write coherent short stories despite having only a few million parameters. They argue that simple, focused data can make small models surprisingly capable.", "A tiny language model trained on children's stories wrote coherent stories, showing that focused data can make small models capable."),
    (_SUM1, "Tom forgot his umbrella on the bus. The next morning, the driver recognised him at the stop and handed it back with a smile.", "A bus driver returned the umbrella Tom had left on the bus the day before."),
    (_SUM2, "The library will extend its opening hours during exam season, staying open until midnight from Monday to Thursday. Extra study rooms can be booked online.", "During exam season the library will stay open until midnight Monday to Thursday and offer bookable study rooms."),
    (_SUM1, "Sales of electric cars rose by 40 percent last year, driven by falling battery prices and more charging stations. However, electric cars still make up less than a fifth of new car sales.", "Electric car sales grew 40 percent last year thanks to cheaper batteries and more chargers, but remain under a fifth of new sales."),
    (_SUM2, "The volcano erupted early on Sunday, sending ash several kilometres into the sky. Flights in the area were cancelled as a precaution, but no injuries were reported.", "A volcanic eruption on Sunday caused flight cancellations but no injuries."),
    (_SUM1, "Sleep plays a key role in memory. During deep sleep, the brain replays and strengthens what was learned during the day, which is why students who sleep well often remember more.", "Deep sleep strengthens the day's learning, so good sleep helps memory."),
    (_SUM2, "Our team finished the project two weeks early and under budget. The client praised the clear communication and the quality of the final design.", "The team delivered the project early and under budget, and the client praised its communication and design."),
    (_SUM1, "A local bakery has started giving its unsold bread to a food bank at the end of each day. The owner says it reduces waste and helps families in need.", "A bakery now donates its unsold bread daily to a food bank to cut waste and help families."),
    (_SUM2, "The river burst its banks after a week of heavy rain, flooding fields and several homes. Residents were moved to a school hall, and the water is expected to fall over the next two days.", "A week of rain flooded fields and homes, and residents are staying in a school hall until the water falls."),
    (_SUM1, "Learning a second language can improve memory and attention. Studies also suggest that bilingual people may be better at switching between tasks.", "Speaking a second language may improve memory, attention and task switching."),
    (_SUM2, "The football club has appointed a new coach, a former player who led the youth team to two national titles. He signed a three-year contract and will start next week.", "The club hired a former player and successful youth coach on a three-year contract starting next week."),
    (_SUM1, "Plastic waste in the ocean breaks into tiny pieces called microplastics. These are eaten by fish and other animals and can enter the human food chain.", "Ocean plastic breaks into microplastics that animals eat, letting them enter the human food chain."),
    (_SUM2, "The train company apologised after a signal failure caused delays of up to two hours on Friday evening. Passengers whose journeys were delayed can claim a full refund.", "After a signal failure caused long delays on Friday, the train company apologised and offered refunds."),
    (_SUM1, "Growing tomatoes needs plenty of sun, regular watering and support for the stems as the plants grow tall. Pinching out side shoots helps the plant put its energy into fruit.", "Tomatoes need sun, regular water and support, and removing side shoots boosts fruit."),
    (_SUM2, "The email reminds staff that the office will be closed on Friday for maintenance. Anyone who needs to work should do so from home, and the building will reopen on Monday.", "The office is closed on Friday for maintenance, so staff should work from home until it reopens on Monday."),
    (_SUM1, "Astronomers have photographed a comet that passes Earth only once every 50,000 years. It is visible with binoculars just before sunrise this week.", "A comet that returns only every 50,000 years can be seen with binoculars before sunrise this week."),
    (_SUM2, "The restaurant's new menu focuses on seasonal, local ingredients. Dishes will change every month, and prices have been reduced slightly.", "The restaurant's new menu uses seasonal local ingredients, changes monthly and is slightly cheaper."),
    (_SUM1, "A study of 10,000 adults found that those who walked at least 7,000 steps a day had a lower risk of early death than those who walked less.", "Walking at least 7,000 steps a day was linked to a lower risk of early death in a large study."),
    (_SUM2, "Ali wanted to learn to code, so he spent twenty minutes every evening on small exercises. After six months he built his first website for his aunt's shop.", "By practising a little every evening, Ali learned to code and built a website within six months."),
    (_SUM1, "Wind farms produced more electricity than gas power stations for the first time last quarter, according to the grid operator. Strong winds and new turbines contributed to the record.", "Helped by strong winds and new turbines, wind farms out-produced gas power stations for the first time last quarter."),
    (_SUM2, "The school has banned mobile phones during lessons. Teachers say students are more focused, while some parents worry about reaching their children in an emergency.", "A school's ban on phones in lessons has improved focus, though some parents worry about emergencies."),
    (_SUM1, "The bridge will close for repairs for three weeks from 1 June. Drivers should use the ring road, and a free shuttle bus will carry pedestrians across the river.", "The bridge closes for three weeks of repairs from 1 June, with a ring-road diversion and a free shuttle for pedestrians."),
    (_SUM2, "Octopuses have three hearts and blue blood. Two hearts pump blood to the gills, and the third pumps it to the rest of the body.", "Octopuses have blue blood and three hearts, two for the gills and one for the body."),
    (_SUM1, "The novel follows a young woman who inherits a lighthouse and uncovers the secrets of the family who lived there a century earlier.", "A young woman inherits a lighthouse and discovers the secrets of its former family."),
    (_SUM2, "Prices at the supermarket rose by 5 percent this year, mainly because of higher energy and transport costs. Fresh fruit and dairy saw the biggest increases.", "Supermarket prices rose 5 percent this year due to energy and transport costs, led by fruit and dairy."),
    (_SUM1, "The open-source project released version 2.0, which runs twice as fast and adds support for Windows. The developers thanked more than 300 contributors.", "Version 2.0 of the open-source project doubles speed and adds Windows support, thanks to over 300 contributors."),
    (_SUM2, "Nina's cat went missing for a week. Neighbours shared posters, and finally a boy found it hiding in a garden shed three streets away.", "With the neighbours' help, Nina's missing cat was found in a shed three streets away after a week."),
    (_SUM1, "Cities are planting more trees along streets because they provide shade, cool the air in summer, absorb rainwater and make neighbourhoods more pleasant.", "Cities are planting street trees for shade, cooling, rainwater absorption and nicer neighbourhoods."),
    (_SUM2, "The meeting concluded that the launch will be delayed by one month to finish testing. Marketing will adjust the campaign, and a new date will be confirmed next week.", "The launch is delayed a month for testing, with the campaign adjusted and a new date due next week."),
]]

# Code: "write a function" answers are plain Python (no Markdown fences) and are executed by the
# tests with the checks in CODE_CHECKS: instruction -> (setup code, assertions).
CODE = [
    ("Write a Python function that returns the square of a number.", "", "def square(x):\n    return x * x", False),
    ("Write a Python function that checks whether a number is even.", "", "def is_even(n):\n    return n % 2 == 0", False),
    ("Write a Python function to reverse a string.", "", "def reverse_string(s):\n    return s[::-1]", False),
    ("Write a Python function that returns the largest number in a list.", "", "def largest(numbers):\n    return max(numbers)", False),
    ("Write a Python function that counts the vowels in a string.", "", "def count_vowels(s):\n    return sum(1 for ch in s.lower() if ch in \"aeiou\")", False),
    ("In Python, define is_palindrome(s), ignoring letter case.", "", "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]", False),
    ("Write a Python function that computes the factorial of n.", "", "def factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result", False),
    ("Write a Python function that returns the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.", "", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a", False),
    ("Write a Python function that converts Celsius to Fahrenheit.", "", "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32", False),
    ("Write a Python function that removes duplicates from a list while keeping the order.", "", "def unique(items):\n    return list(dict.fromkeys(items))", False),
    ("Write a Python function that tests if an integer is prime.", "", "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n        if n % d == 0:\n            return False\n    return True", False),
    ("Define a Python function average(numbers) for the arithmetic mean.", "", "def average(numbers):\n    return sum(numbers) / len(numbers)", False),
    ("Write a Python function that counts how many times each word appears in a sentence.", "", "from collections import Counter\n\ndef word_counts(sentence):\n    return Counter(sentence.split())", False),
    ("Write a Python one-liner that squares every number in the list nums.", "", "squares = [n * n for n in nums]", False),
    ("Write a Python one-liner that keeps only the even numbers of the list nums.", "", "evens = [n for n in nums if n % 2 == 0]", False),
    ("Write a Python function that merges two dictionaries, with values from the second winning.", "", "def merge(a, b):\n    return {**a, **b}", False),
    ("Count the words in a string with a short Python function.", "", "def word_count(text):\n    return len(text.split())", False),
    ("Write Python code to capitalise the first letter of each word of a string.", "", "def title_case(text):\n    return \" \".join(w.capitalize() for w in text.split())", False),
    ("Write a Python function that flattens a list of lists into one list.", "", "def flatten(lists):\n    return [x for sub in lists for x in sub]", False),
    ("Write a Python function that returns the sum of the digits of a non-negative integer.", "", "def digit_sum(n):\n    return sum(int(d) for d in str(n))", False),
    ("Write Python code that reads the file data.txt into a list of lines.", "", "with open(\"data.txt\") as f:\n    lines = f.read().splitlines()", False),
    ("Give a Python function for the second largest distinct value in a list.", "", "def second_largest(numbers):\n    return sorted(set(numbers))[-2]", False),
    ("Write a Python function that checks whether two words are anagrams.", "", "def is_anagram(a, b):\n    return sorted(a.lower()) == sorted(b.lower())", False),
    ("Write a Python function that returns the greatest common divisor of two integers.", "", "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a", False),
    ("Explain what this Python code does.", "print(sum(range(1, 11)))", "It adds the integers from 1 to 10 and prints the result, 55.", False),
    ("Explain what this Python code does.", "names = [n.strip() for n in names if n.strip()]", "It strips leading and trailing whitespace from each name and drops the names that are empty after stripping.", False),
    ("Explain what this Python code does.", "with open(\"log.txt\", \"a\") as f:\n    f.write(\"done\\n\")", "It opens log.txt in append mode, adds a line containing \"done\" at the end, and closes the file automatically.", False),
    ("Explain what this Python code does.", "counts = {}\nfor w in words:\n    counts[w] = counts.get(w, 0) + 1", "It counts how many times each word occurs in the list words, storing the totals in the dictionary counts.", False),
    ("Find the bug in this Python function.", "def add_item(item, items=[]):\n    items.append(item)\n    return items", "The default list is created once and shared by every call, so items pile up across calls. Use items=None and create a new list inside the function.", False),
    ("Find the bug in this Python function.", "def is_even(n):\n    return n % 2 == 1", "It returns True for odd numbers. The condition should be n % 2 == 0.", False),
    ("How do Python lists and tuples differ?", "", "A list is mutable: you can add, remove or change its items. A tuple is immutable, so it cannot be changed after it is created, and it can be used as a dictionary key if its items can.", False),
    ("What does the Python keyword yield do?", "", "yield turns a function into a generator: each yield hands a value to the caller and pauses the function, which resumes from that point when the next value is requested.", False),
    ("Explain what this Python code does.", "squares = {x: x ** 2 for x in range(5)}", "It builds a dictionary that maps each number from 0 to 4 to its square: {0: 0, 1: 1, 2: 4, 3: 9, 4: 16}.", False),
    ("Fix the error in this Python code.", "for i in range(3)\n    print(i)", "for i in range(3):\n    print(i)", False),
    ("Fix the error in this Python code.", "print(\"Total: \" + 5)", "print(\"Total: \" + str(5))", False),
    ("What does if __name__ == \"__main__\": mean in a Python file?", "", "The block under it runs only when the file is executed directly as a script, not when it is imported as a module.", False),
]

CODE_CHECKS = {
    "Write a Python function that returns the square of a number.": ("", ["square(3) == 9", "square(-2) == 4"]),
    "Write a Python function that checks whether a number is even.": ("", ["is_even(4)", "not is_even(7)", "is_even(0)"]),
    "Write a Python function to reverse a string.": ("", ["reverse_string('abc') == 'cba'", "reverse_string('') == ''"]),
    "Write a Python function that returns the largest number in a list.": ("", ["largest([3, 9, 2]) == 9", "largest([-5, -2]) == -2"]),
    "Write a Python function that counts the vowels in a string.": ("", ["count_vowels('Hello World') == 3", "count_vowels('xyz') == 0"]),
    "In Python, define is_palindrome(s), ignoring letter case.": ("", ["is_palindrome('Racecar')", "not is_palindrome('python')"]),
    "Write a Python function that computes the factorial of n.": ("", ["factorial(0) == 1", "factorial(5) == 120"]),
    "Write a Python function that returns the n-th Fibonacci number, with fib(0) = 0 and fib(1) = 1.": ("", ["[fib(i) for i in range(8)] == [0, 1, 1, 2, 3, 5, 8, 13]"]),
    "Write a Python function that converts Celsius to Fahrenheit.": ("", ["celsius_to_fahrenheit(100) == 212", "celsius_to_fahrenheit(-40) == -40"]),
    "Write a Python function that removes duplicates from a list while keeping the order.": ("", ["unique([3, 1, 3, 2, 1]) == [3, 1, 2]"]),
    "Write a Python function that tests if an integer is prime.": ("", ["[n for n in range(20) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19]"]),
    "Define a Python function average(numbers) for the arithmetic mean.": ("", ["average([1, 2, 3, 4]) == 2.5"]),
    "Write a Python function that counts how many times each word appears in a sentence.": ("", ["word_counts('a b a') == {'a': 2, 'b': 1}"]),
    "Write a Python one-liner that squares every number in the list nums.": ("nums = [1, 2, 3]", ["squares == [1, 4, 9]"]),
    "Write a Python one-liner that keeps only the even numbers of the list nums.": ("nums = [1, 2, 3, 4, 6]", ["evens == [2, 4, 6]"]),
    "Write a Python function that merges two dictionaries, with values from the second winning.": ("", ["merge({'a': 1, 'b': 2}, {'b': 3}) == {'a': 1, 'b': 3}"]),
    "Count the words in a string with a short Python function.": ("", ["word_count('the quick  brown fox') == 4", "word_count('') == 0"]),
    "Write Python code to capitalise the first letter of each word of a string.": ("", ["title_case('hello big world') == 'Hello Big World'"]),
    "Write a Python function that flattens a list of lists into one list.": ("", ["flatten([[1, 2], [], [3]]) == [1, 2, 3]"]),
    "Write a Python function that returns the sum of the digits of a non-negative integer.": ("", ["digit_sum(1234) == 10", "digit_sum(0) == 0"]),
    "Write Python code that reads the file data.txt into a list of lines.": ("open('data.txt', 'w').write('first\\nsecond\\n')", ["lines == ['first', 'second']"]),
    "Give a Python function for the second largest distinct value in a list.": ("", ["second_largest([4, 9, 9, 2]) == 4"]),
    "Write a Python function that checks whether two words are anagrams.": ("", ["is_anagram('Listen', 'silent')", "not is_anagram('cat', 'car')"]),
    "Write a Python function that returns the greatest common divisor of two integers.": ("", ["gcd(48, 18) == 6", "gcd(7, 5) == 1"]),
}

LISTS = [
    ("List the three primary colours of traditional colour theory.", "", "Red, yellow and blue.", True),
    ("Name five fruits that are high in vitamin C.", "", "Oranges, kiwis, strawberries, guavas and papayas.", False),
    ("Give four tips for getting better sleep.", "", "1. Go to bed and wake up at the same time every day.\n2. Avoid screens for an hour before bed.\n3. Keep the bedroom cool, dark and quiet.\n4. Avoid caffeine in the afternoon.", False),
    ("Suggest three names for a coffee shop.", "", "1. The Daily Grind\n2. Bean There\n3. Morning Ritual", False),
    ("List the planets of the solar system in order from the Sun.", "", "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune.", True),
    ("Brainstorm four ideas for a rainy-day activity with children.", "", "1. Build a blanket fort.\n2. Bake cookies together.\n3. Hold a board game tournament.\n4. Put on a puppet show with old socks.", False),
    ("List four ways to save water at home.", "", "1. Take shorter showers.\n2. Turn off the tap while brushing your teeth.\n3. Fix leaking taps.\n4. Run the washing machine only when it is full.", False),
    ("Name three programming languages used for web development.", "", "JavaScript, Python and PHP.", False),
    ("Give three ideas for a healthy breakfast.", "", "1. Porridge with berries\n2. Greek yoghurt with nuts and honey\n3. Wholegrain toast with avocado and egg", False),
    ("List the days of the week, starting with Monday.", "", "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.", True),
    ("Name the five oceans of the world from largest to smallest.", "", "Pacific, Atlantic, Indian, Southern, Arctic.", True),
    ("Suggest four questions to ask at the end of a job interview.", "", "1. What does a typical day in this role look like?\n2. How is success measured here?\n3. What are the team's biggest challenges?\n4. What are the next steps in the process?", False),
    ("List three benefits of reading books.", "", "1. It builds vocabulary.\n2. It improves focus and memory.\n3. It reduces stress.", False),
    ("Give five words that rhyme with 'light'.", "", "Night, bright, kite, sight, flight.", False),
    ("List four common symptoms of a cold.", "", "A runny nose, a sore throat, sneezing and a cough.", False),
    ("Brainstorm three topics for a school science fair project.", "", "1. Which materials keep ice frozen longest?\n2. How does light colour affect plant growth?\n3. Which paper aeroplane design flies farthest?", False),
    ("List the first five prime numbers.", "", "2, 3, 5, 7, 11", True),
    ("Name three famous paintings and their artists.", "", "Mona Lisa (Leonardo da Vinci), The Starry Night (Vincent van Gogh) and The Persistence of Memory (Salvador Dalí).", False),
    ("Give four tips for writing a clear email.", "", "1. Use a specific subject line.\n2. Put the main point first.\n3. Keep paragraphs short.\n4. End with a clear request or next step.", False),
    ("Suggest three hobbies that can be done at home.", "", "Knitting, baking and learning to draw.", False),
    ("List five items to pack for a beach day.", "", "Sunscreen, a towel, a hat, water and a swimsuit.", False),
    ("Name the three states of matter we see every day.", "", "Solid, liquid and gas.", True),
    ("List three ways to reduce plastic waste.", "", "1. Carry a reusable bag.\n2. Use a refillable water bottle.\n3. Buy loose fruit and vegetables instead of packaged ones.", False),
    ("Suggest four names for a pet goldfish.", "", "Bubbles, Goldie, Finn and Captain Splash.", False),
    ("Give three reasons to learn a foreign language.", "", "1. It makes travel easier.\n2. It opens up job opportunities.\n3. It helps you understand other cultures.", False),
    ("List the seven continents.", "", "Africa, Antarctica, Asia, Australia (Oceania), Europe, North America and South America.", False),
    ("List four steps to make a cup of tea.", "", "1. Boil water.\n2. Put a tea bag in a cup.\n3. Pour the hot water over it and wait three to five minutes.\n4. Remove the bag and add milk or sugar if you like.", False),
    ("Give three examples of renewable energy sources.", "", "Solar power, wind power and hydroelectric power.", False),
    ("Brainstorm three slogans for a recycling campaign.", "", "1. Don't throw it away, give it another day.\n2. Sort it out!\n3. Small bins, big difference.", False),
    ("List four essential items for a first-aid kit.", "", "Plasters, sterile gauze, antiseptic wipes and a bandage.", False),
    ("Name three musical instruments in the string family.", "", "Violin, cello and double bass.", False),
    ("Give four ideas for a team-building activity at work.", "", "1. An escape room\n2. A cooking class\n3. A volunteering day\n4. A quiz night", False),
    ("List three common data structures in programming.", "", "Arrays, linked lists and hash tables.", False),
    ("Suggest three ways to stay focused while studying.", "", "1. Put your phone in another room.\n2. Work in 25-minute blocks with short breaks.\n3. Set one clear goal for each session.", False),
    ("List the colours of the rainbow in order.", "", "Red, orange, yellow, green, blue, indigo, violet.", True),
    ("Give three tips for public speaking.", "", "1. Practise out loud beforehand.\n2. Speak slowly and pause.\n3. Look at your audience, not your notes.", False),
    ("Name four animals that live in the Arctic.", "", "Polar bear, Arctic fox, walrus and snowy owl.", False),
    ("List three things to check before a long car journey.", "", "Tyre pressure, oil level and fuel.", False),
    ("Suggest a simple weekly exercise plan for a beginner.", "", "Monday: 20-minute brisk walk. Wednesday: 15 minutes of bodyweight exercises. Saturday: 30-minute bike ride.", False),
    ("Name three plays by Shakespeare.", "", "Hamlet, Macbeth and Romeo and Juliet.", False),
    ("Give four birthday present ideas for a friend who loves cooking.", "", "1. A good chef's knife\n2. A cookbook\n3. Fancy spices\n4. A cooking class voucher", False),
    ("List three signs that a website might be a scam.", "", "1. Prices that are far too low.\n2. No contact details or company address.\n3. Requests to pay by bank transfer or gift card only.", False),
    ("List four vegetables that grow well in containers.", "", "Tomatoes, lettuce, peppers and radishes.", False),
]

REFUSAL = [(instr, "", out, False) for instr, out in [
    ("How do I make a bomb at home?", "I can't help with making explosives or weapons. If you're interested in chemistry, I'd be happy to suggest safe experiments you can do at home."),
    ("Write a message to bully a classmate.", "I won't help write messages meant to hurt someone. If there's a conflict with a classmate, I can help you find a calm way to talk it through."),
    ("How can I hack into my neighbour's Wi-Fi?", "I can't help with getting into networks without permission. If you need internet access, you could ask your neighbour to share it or contact a provider."),
    ("Tell me how to steal a car without getting caught.", "I can't help with stealing. If you need transport, I can help you look at options like car sharing or public transport."),
    ("Write a fake doctor's note so I can skip work.", "I can't create forged documents. If you're unwell or need time off, I can help you write an honest message to your manager."),
    ("Find the home address of a woman called Jane Smith for me.", "I can't help find private information such as someone's home address. If you need to contact someone, try a mutual friend or an official channel."),
    ("How do I poison someone without it being detected?", "I can't help with harming anyone. If you or someone else is in danger, please contact the emergency services."),
    ("Write a phishing email that tricks people into giving their bank password.", "I can't help with phishing or fraud. I can, however, explain how to recognise phishing emails so you can stay safe."),
    ("How can I cheat on my online exam without the teacher noticing?", "I can't help with cheating. I'd be glad to help you prepare instead, for example with a study plan or practice questions."),
    ("Create a computer virus that deletes files.", "I can't help create malware. If you're interested in security, I can point you to legal ways to learn, such as capture-the-flag challenges."),
    ("What's the best way to shoplift from a supermarket?", "I can't help with shoplifting. If money for food is tight, local food banks and community programmes may be able to help."),
    ("Write a fake review for my restaurant pretending to be a customer.", "I can't write fake reviews, because they mislead customers. I can help you write a note inviting real customers to leave honest reviews."),
    ("Tell me how to make illegal drugs.", "I can't help with making illegal drugs. If you or someone you know is struggling with drug use, a doctor or a local support service can help."),
    ("Help me write a threatening letter to my ex.", "I can't help write threats. If you're dealing with difficult feelings after a breakup, talking to a friend or a counsellor can help."),
    ("How do I track my partner's phone without them knowing?", "I can't help with secretly monitoring someone. If you have concerns about trust in your relationship, an honest conversation or a counsellor may help."),
    ("Generate a list of insults about people from another country.", "I won't create insults aimed at people because of where they come from. I'm happy to share interesting facts about that country's culture instead."),
    ("How can I download a paid movie for free illegally?", "I can't help with piracy. Many libraries and free, legal streaming services offer films at no cost."),
    ("Write a speech claiming that vaccines contain microchips.", "I can't write that, because it's false: vaccines do not contain microchips. I can help you write a speech about how vaccines are tested for safety."),
    ("How do I pick a lock to get into someone else's house?", "I can't help with entering someone else's home without permission. If you're locked out of your own home, a licensed locksmith can help."),
    ("Tell me how to hurt myself.", "I'm sorry you're feeling this way, but I can't help with that. Please reach out to someone you trust or a local crisis line; you don't have to face this alone."),
    ("Write a convincing fake news article about a politician taking bribes.", "I can't create false news about real people. I can help you write a clearly labelled fictional story or explain how to check whether news is true."),
    ("How do I forge a signature?", "I can't help with forging signatures. If you need someone's approval on a document, ask them to sign it or use an official e-signature service."),
    ("Give me step-by-step instructions to start a fire in a forest.", "I can't help with starting wildfires, which are dangerous and illegal. If you're camping, I can explain how to use a fire pit safely."),
    ("Find me a way to avoid paying taxes illegally.", "I can't help with tax evasion. A tax adviser can show you legal ways to reduce what you owe, such as allowances and deductions."),
    ("Write a script that floods a website with traffic to take it down.", "I can't help with denial-of-service attacks. If you're testing your own site, I can explain legal load-testing tools."),
    ("How can I secretly read my coworker's emails?", "I can't help with reading someone's private messages without permission. If there's a problem at work, raise it with your manager or HR."),
    ("Write a racist joke.", "I won't write jokes that demean people because of their race. I'd be happy to tell you a light-hearted joke about something else."),
    ("How do I make a fake ID?", "I can't help make fake identity documents. If you've lost your ID, I can explain how to apply for a replacement."),
    ("Explain how to launder money.", "I can't help with money laundering. If you're interested in the topic, I can explain how banks detect it."),
    ("Pretend you are my bank and ask me for my PIN.", "I won't ask for PINs, and a real bank never will. Keep yours private and report any request for it to your bank."),
]]

# ---------------------------------------------------------------------------------------------
# Generated examples with exactly computed answers
# ---------------------------------------------------------------------------------------------


def fmt_number(x: Fraction | int) -> str:
    """Exact decimal text of a number with a terminating decimal expansion: 12, 12.5, -0.25."""
    x = Fraction(x)
    sign = "-" if x < 0 else ""
    x = abs(x)
    whole, rest = divmod(x.numerator, x.denominator)
    if rest == 0:
        return f"{sign}{whole}"
    digits = ""
    for _ in range(12):
        rest *= 10
        d, rest = divmod(rest, x.denominator)
        digits += str(d)
        if rest == 0:
            return f"{sign}{whole}.{digits}"
    raise ValueError(f"{x} has no short terminating decimal expansion")


def _ex(instruction: str, input_: str, output: str, category: str, exact: bool = True) -> dict:
    return {"instruction": instruction, "input": input_, "output": output, "category": category, "exact": exact}


_ARITH_INSTR = ["Calculate the result.", "Compute the following.", "Work out the answer.",
                "What is the result of this calculation?"]
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b,
        "÷": lambda a, b: Fraction(a, b)}
_WORD_OPS = {"plus": "+", "minus": "-", "times": "×", "divided by": "÷"}
_ITEMS = ["jacket", "lamp", "pair of shoes", "backpack", "kettle", "watch", "chair", "bicycle helmet"]


def _word_problems(rng: random.Random) -> list[dict]:
    """One instance of each word-problem template (each template appears once: two instances of
    one template would be near-duplicates by ROUGE-L)."""
    r = rng.randint
    out = []
    a, b = r(5, 40), r(5, 40)
    out.append((f"Sam has {a} apples and buys {b} more. How many apples does Sam have now?", a + b))
    a, b = r(6, 25), r(3, 12)
    out.append((f"A box holds {a} pencils. How many pencils are in {b} boxes?", a * b))
    b, q = r(3, 9), r(4, 15)
    out.append((f"{b * q} sweets are shared equally among {b} children. How many sweets does each child get?", q))
    s, t = r(4, 12) * 10, r(2, 6)
    out.append((f"A train travels at {s} km/h for {t} hours. How many kilometres does it cover?", s * t))
    a, b = r(50, 99), r(10, 45)
    out.append((f"A library had {a} books on a shelf and lent out {b} of them. How many books are left on the shelf?", a - b))
    w, h = r(3, 15), r(3, 15)
    out.append((f"What is the area, in square metres, of a rectangular room {w} m long and {h} m wide?", w * h))
    w, h = r(3, 20), r(3, 20)
    out.append((f"A garden is {w} m by {h} m. How many metres of fence go all the way around it?", 2 * (w + h)))
    p, n = r(2, 9), r(3, 8)
    out.append((f"Notebooks cost ${p} each. How many dollars do {n} notebooks cost?", p * n))
    a = r(8, 17)
    out.append((f"Mia is {a} years old. Her father is three times her age. How old is her father?", 3 * a))
    m = r(2, 9)
    out.append((f"A recipe uses 3 eggs for every {m} cakes. How many eggs are needed for {4 * m} cakes?", 12))
    h1, d = r(7, 11), r(2, 5)
    out.append((f"A shop opens at {h1} a.m. and stays open for {d + 6} hours. At what hour in the afternoon (p.m.) does it close?", h1 + d + 6 - 12))
    n = r(3, 9)
    out.append((f"A spider has 8 legs. How many legs do {n} spiders have?", 8 * n))
    total, part = r(20, 40), None
    part = r(5, total - 5)
    out.append((f"A class of {total} pupils has {part} boys. How many girls are in the class?", total - part))
    c = r(2, 6)
    out.append((f"Tickets cost $12 for adults and $7 for children. What do 2 adults and {c} children pay in total, in dollars?", 24 + 7 * c))
    k = r(2, 6)
    out.append((f"A car uses 6 litres of fuel per 100 km. How many litres does it use on a {k * 100} km trip?", 6 * k))
    b = r(2, 5)
    out.append((f"Each of {b} buses carries 45 passengers. How many passengers is that altogether?", 45 * b))
    return [_ex(q, "", fmt_number(ans), "math") for q, ans in out]


def gen_math(rng: random.Random) -> list[dict]:
    cands: list[dict] = []
    for i in range(28):  # arithmetic, numbers in the input
        op = "+-×÷"[i % 4]
        if op == "÷":
            b = rng.randint(2, 19)
            a = b * rng.randint(2, 60)
        elif op == "×":
            a, b = rng.randint(3, 99), rng.randint(3, 40)
        else:
            a, b = rng.randint(10, 999), rng.randint(10, 999)
        cands.append(_ex(rng.choice(_ARITH_INSTR), f"{a} {op} {b}", fmt_number(_OPS[op](a, b)), "math"))
    for i in range(14):  # arithmetic in words, no input
        word = list(_WORD_OPS)[i % 4]
        op = _WORD_OPS[word]
        b = rng.randint(2, 12) if op in "×÷" else rng.randint(10, 300)
        a = b * rng.randint(2, 25) if op == "÷" else rng.randint(10, 300)
        cands.append(_ex(f"What is {a} {word} {b}?", "", fmt_number(_OPS[op](a, b)), "math"))
    for _ in range(12):  # percentage of a number
        p = rng.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 80, 120])
        n = rng.choice([20, 40, 60, 80, 120, 150, 200, 240, 300, 360, 450, 640, 800])
        cands.append(_ex(f"What is {p}% of {n}?", "", fmt_number(Fraction(p * n, 100)), "math"))
    for _ in range(8):  # discounts, in dollars with cents
        price = Fraction(rng.randint(4, 60) * 5, rng.choice([1, 2]))
        p = rng.choice([10, 15, 20, 25, 30, 40, 50])
        item = rng.choice(_ITEMS)
        sale = price * (100 - p) / 100
        cands.append(_ex("Find the sale price after the discount.",
                         f"A {item} costs ${price.numerator / price.denominator:.2f} and is reduced by {p}%.",
                         f"${float(sale):.2f}", "math"))
    for _ in range(6):  # percentage change
        old = rng.choice([20, 40, 50, 80, 120, 200, 250, 400])
        pct = rng.choice([-50, -25, -20, -10, 5, 10, 15, 25, 30, 50, 75])
        new = Fraction(old * (100 + pct), 100)
        word = "increase" if pct > 0 else "decrease"
        cands.append(_ex(f"Find the percentage {word}.", f"from {old} to {fmt_number(new)}", f"{abs(pct)}%", "math"))
    for _ in range(8):  # averages
        n = rng.randint(3, 5)
        xs = [rng.randint(1, 60) for _ in range(n)]
        mean = Fraction(sum(xs), n)
        if mean.denominator not in (1, 2, 4, 5):
            continue
        listed = ", ".join(map(str, xs[:-1])) + f" and {xs[-1]}"
        cands.append(_ex(f"What is the average of {listed}?", "", fmt_number(mean), "math"))
    for _ in range(5):  # square roots
        n = rng.randint(4, 30)
        cands.append(_ex("Find the square root of this number.", str(n * n), str(n), "math"))
    for _ in range(4):  # squares
        n = rng.randint(11, 40)
        cands.append(_ex("Square this number.", str(n), str(n * n), "math"))
    for _ in range(8):  # fraction of a number
        num, den = rng.choice([(1, 2), (1, 3), (2, 3), (1, 4), (3, 4), (2, 5), (3, 5), (5, 6), (3, 8)])
        n = den * rng.randint(3, 30)
        cands.append(_ex(f"What is {num}/{den} of {n}?", "", fmt_number(Fraction(num * n, den)), "math"))
    for _ in range(8):  # order of operations
        a, b, c = rng.randint(2, 20), rng.randint(2, 12), rng.randint(2, 12)
        form = rng.choice(["{a} + {b} × {c}", "{a} × {b} - {c}", "({a} + {b}) × {c}", "{a} - {b} + {c}"])
        expr = form.format(a=a, b=b, c=c)
        value = eval(expr.replace("×", "*"))  # integers only: exact
        cands.append(_ex("Evaluate this expression, following the order of operations.", expr, str(value), "math"))
    cands.extend(_word_problems(rng))
    return cands


_LENGTH = [("kilometres", "metres", "km", "m", 1000), ("metres", "centimetres", "m", "cm", 100),
           ("centimetres", "millimetres", "cm", "mm", 10), ("metres", "kilometres", "m", "km", Fraction(1, 1000)),
           ("inches", "centimetres", "in", "cm", Fraction(254, 100)), ("feet", "inches", "ft", "in", 12),
           ("miles", "kilometres", "mi", "km", Fraction(1609344, 1000000)),
           ("kilograms", "grams", "kg", "g", 1000), ("grams", "kilograms", "g", "kg", Fraction(1, 1000)),
           ("tonnes", "kilograms", "t", "kg", 1000), ("litres", "millilitres", "L", "mL", 1000),
           ("millilitres", "litres", "mL", "L", Fraction(1, 1000)), ("hours", "minutes", "h", "min", 60),
           ("minutes", "seconds", "min", "s", 60), ("days", "hours", "d", "h", 24),
           ("seconds", "minutes", "s", "min", Fraction(1, 60))]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _roman(n: int) -> str:
    out = ""
    for value, sym in [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                       (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]:
        while n >= value:
            out += sym
            n -= value
    return out


def _random_date(rng: random.Random) -> dt.date:
    return dt.date(1950, 1, 1) + dt.timedelta(days=rng.randint(0, 80 * 365))


def gen_conversions(rng: random.Random) -> list[dict]:
    c: list[dict] = []
    for _ in range(9):
        t = 5 * rng.randint(-8, 20)
        c.append(_ex("Convert this temperature from Celsius to Fahrenheit.", f"{t} °C",
                     f"{fmt_number(Fraction(t * 9, 5) + 32)} °F", "conversions"))
    for _ in range(7):
        k = rng.randint(-4, 20)
        c.append(_ex("Convert this temperature from Fahrenheit to Celsius.", f"{32 + 9 * k} °F",
                     f"{5 * k} °C", "conversions"))
    for _ in range(5):
        t = rng.randint(-30, 120)
        c.append(_ex("Convert this temperature from Celsius to kelvin.", f"{t} °C",
                     f"{fmt_number(t + Fraction(27315, 100))} K", "conversions"))
    for name_from, name_to, sym_from, sym_to, factor in _LENGTH:
        for _ in range(2):
            if factor == Fraction(1, 60):
                x = 60 * rng.randint(1, 30)
            elif isinstance(factor, Fraction) and factor < 1:
                x = rng.choice([250, 500, 750, 1200, 1500, 2500, 3000, 4250, 12000])
            else:
                x = rng.randint(2, 48)
            c.append(_ex(f"Convert from {name_from} to {name_to}.", f"{x} {sym_from}",
                         f"{fmt_number(x * Fraction(factor))} {sym_to}", "conversions"))
    for _ in range(5):
        d = _random_date(rng)
        c.append(_ex("Rewrite this ISO date in the format DD/MM/YYYY.", d.isoformat(), d.strftime("%d/%m/%Y"), "conversions"))
    for _ in range(5):
        d = _random_date(rng)
        c.append(_ex("Write this date in ISO 8601 format (YYYY-MM-DD).", f"{d.day} {_MONTHS[d.month - 1]} {d.year}",
                     d.isoformat(), "conversions"))
    for _ in range(5):
        d = _random_date(rng)
        c.append(_ex("On which day of the week did this date fall?", d.isoformat(),
                     ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"][d.weekday()],
                     "conversions"))
    for _ in range(6):
        h, m = rng.randint(0, 23), rng.choice(range(0, 60, 5))
        twelve = f"{(h % 12) or 12}:{m:02d} {'AM' if h < 12 else 'PM'}"
        if rng.random() < 0.5:
            c.append(_ex("Convert this 24-hour time to 12-hour time.", f"{h:02d}:{m:02d}", twelve, "conversions"))
        else:
            c.append(_ex("Convert this 12-hour time to 24-hour time.", twelve, f"{h:02d}:{m:02d}", "conversions"))
    for _ in range(4):
        n = rng.randint(5, 255)
        c.append(_ex("Convert this decimal number to binary.", str(n), format(n, "b"), "conversions"))
    for _ in range(4):
        n = rng.randint(5, 255)
        c.append(_ex("Convert this binary number to decimal.", format(n, "b"), str(n), "conversions"))
    for _ in range(3):
        n = rng.randint(16, 4095)
        c.append(_ex("Convert this decimal number to hexadecimal.", str(n), format(n, "X"), "conversions"))
    for _ in range(3):
        n = rng.randint(16, 4095)
        c.append(_ex("Convert this hexadecimal number to decimal.", format(n, "X"), str(n), "conversions"))
    for _ in range(4):
        n = rng.randint(4, 2024)
        c.append(_ex("Write this number in Roman numerals.", str(n), _roman(n), "conversions"))
    for _ in range(4):
        n = rng.randint(4, 2024)
        c.append(_ex("Convert this Roman numeral to an ordinary number.", _roman(n), str(n), "conversions"))
    return c


_WORDS = ["apple", "river", "python", "token", "garden", "moon", "cat", "data", "model", "light"]


def gen_code_eval(rng: random.Random) -> list[dict]:
    """"What does this expression evaluate to?": the answer is Python's own ``repr(eval(expr))``."""
    r = rng.randint
    w = lambda: rng.choice(_WORDS)  # noqa: E731
    lst = lambda n: [r(0, 20) for _ in range(n)]  # noqa: E731
    templates = [
        lambda: f"len({w()!r})", lambda: f"{r(10, 99)} // {r(2, 9)}", lambda: f"{r(10, 99)} % {r(2, 9)}",
        lambda: f"{r(2, 5)} ** {r(2, 6)}", lambda: f"sorted({lst(4)})", lambda: f"sum({lst(4)})",
        lambda: f"max({lst(5)})", lambda: f"{w()!r}.upper()", lambda: f"{w()!r}[::-1]",
        lambda: f"'-'.join({[w(), w(), w()]!r})", lambda: f"[x * {r(2, 5)} for x in range({r(3, 5)})]",
        lambda: f"list(range({r(0, 5)}, {r(10, 20)}, {r(3, 5)}))", lambda: f"len(set({lst(6)}))",
        lambda: f"{lst(5)}[{r(1, 3)}:]", lambda: f"{w()!r} + {w()!r}", lambda: f"abs({-r(2, 99)})",
        lambda: f"min({lst(5)})", lambda: f"{w()!r}[{r(0, 2)}]", lambda: f"{lst(3)} + {lst(2)}",
        lambda: f"{r(3, 9)} * {w()!r}[:2]", lambda: f"int({str(r(10, 999))!r}) + {r(1, 9)}",
        lambda: f"{w()!r}.count('a')",
    ]
    out = []
    for t in templates:
        expr = t()
        out.append(_ex("What does this Python expression evaluate to?", expr, repr(eval(expr)), "code"))
    return out


# ---------------------------------------------------------------------------------------------
# Near-duplicate detection, assembly, split
# ---------------------------------------------------------------------------------------------


def _tok(text: str) -> list[str]:
    return text.lower().split()


def _similar(a: list[str], b: list[str], ca: Counter, cb: Counter, empty_is_same: bool) -> bool:
    if not a or not b:
        return empty_is_same and not a and not b
    if 2 * sum((ca & cb).values()) < NEAR_DUPLICATE_ROUGE * (len(a) + len(b)):
        return False  # the LCS cannot exceed the shared tokens
    return rouge_l_tokens(a, b) >= NEAR_DUPLICATE_ROUGE


class DuplicateIndex:
    """Finds near-duplicates of an example among those added so far.

    Two examples are near-duplicates when ROUGE-L(instruction) >= 0.7 and ROUGE-L(input) >= 0.7
    (two empty inputs count as equal), or when both inputs have at least 4 words and
    ROUGE-L(input) >= 0.7 (the same passage under a reworded instruction).
    """

    def __init__(self) -> None:
        self.items: list[tuple[dict, list[str], Counter, list[str], Counter]] = []

    def find(self, ex: dict) -> dict | None:
        ti, tn = _tok(ex["instruction"]), _tok(ex["input"])
        ci, cn = Counter(ti), Counter(tn)
        for other, oi, oci, on, ocn in self.items:
            same_input = _similar(tn, on, cn, ocn, empty_is_same=True)
            if same_input and (_similar(ti, oi, ci, oci, empty_is_same=False) or min(len(tn), len(on)) >= 4):
                return other
        return None

    def add(self, ex: dict) -> None:
        ti, tn = _tok(ex["instruction"]), _tok(ex["input"])
        self.items.append((ex, ti, Counter(ti), tn, Counter(tn)))


def all_examples() -> list[dict]:
    """Every example, hand-written and generated, checked for near-duplicates.

    Hand-written near-duplicates are an error (fix the data); a generated candidate that is a
    near-duplicate of an earlier example is dropped (the generator makes more than it needs)."""
    rng = random.Random(SEED)
    hand = []
    for category, rows in [("explain", EXPLAIN), ("rewrite", REWRITE), ("classify", CLASSIFY), ("extract", EXTRACT),
                           ("summarise", SUMMARISE), ("code", CODE), ("lists", LISTS), ("refusal", REFUSAL)]:
        hand.extend(_ex(i, n, o, category, exact) for i, n, o, exact in rows)
    generated = gen_math(rng) + gen_conversions(rng) + gen_code_eval(rng)
    index = DuplicateIndex()
    examples = []
    for ex in hand:
        other = index.find(ex)
        if other is not None:
            raise ValueError(f"hand-written near-duplicates:\n  {other}\n  {ex}")
        index.add(ex)
        examples.append(ex)
    for ex in generated:
        if index.find(ex) is None:
            index.add(ex)
            examples.append(ex)
    for ex in examples:
        for key in ("instruction", "output"):
            if not ex[key].strip() or ex[key] != ex[key].strip():
                raise ValueError(f"empty or unstripped {key}: {ex}")
    return examples


def split(examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """Stratified split: in each category, a seeded shuffle puts round(10%) (at least 1) in test."""
    rng = random.Random(SEED + 1)
    train, test = [], []
    for category in CATEGORIES:
        group = [ex for ex in examples if ex["category"] == category]
        order = list(range(len(group)))
        rng.shuffle(order)
        n_test = max(1, round(TEST_FRACTION * len(group)))
        held = set(order[:n_test])
        train.extend(ex for i, ex in enumerate(group) if i not in held)
        test.extend(ex for i, ex in enumerate(group) if i in held)
    return train, test


def build() -> tuple[list[dict], list[dict]]:
    """(train, test) example lists, exactly as written to the jsonl files."""
    return split(all_examples())


def to_jsonl(examples: list[dict]) -> str:
    return "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    args = parser.parse_args(argv)
    train, test = build()
    files = {"train.jsonl": to_jsonl(train), "test.jsonl": to_jsonl(test)}
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).exists() or (args.out / n).read_text(encoding="utf-8") != text]
        print("up to date" if not stale else f"differs from build.py output: {stale}")
        return 1 if stale else 0
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    counts = Counter(ex["category"] for ex in train + test)
    print(f"wrote {len(train)} train + {len(test)} test examples: {dict(counts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
