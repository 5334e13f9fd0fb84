"""A small built-in labelled text set (3 classes) for examples/train_minilm_classifier.py:
40 training sentences and 14 held-out sentences per class, written for this project."""

from __future__ import annotations

LABELS = ("weather", "sports", "cooking")

TRAIN: dict[str, list[str]] = {
    "weather": [
        "heavy rain is expected tonight", "the forecast calls for snow on monday", "a cold front moves in tomorrow",
        "strong winds knocked down trees", "it will be sunny and warm all week", "fog covered the valley this morning",
        "temperatures will drop below freezing", "a thunderstorm warning was issued", "the humidity is very high today",
        "light showers will clear by noon", "the heatwave continues into the weekend", "hail damaged several cars",
        "clouds will build in the afternoon", "expect a chilly and breezy evening", "the storm brought two inches of rain",
        "a hurricane is approaching the coast", "frost formed on the windows overnight", "the sky will stay overcast",
        "record high temperatures were measured", "drizzle will continue until evening", "the snowstorm closed the roads",
        "winds will calm down after midnight", "a dry spell has lasted three weeks", "lightning lit up the night sky",
        "the monsoon season starts next month", "a flood watch covers the river basin", "sunshine returns on thursday",
        "the air feels damp and cool", "the blizzard dropped a foot of snow", "gusty winds will make it feel colder",
        "the weather service predicts a mild winter", "rain and sleet are mixing tonight", "a tornado touched down nearby",
        "the morning will be clear and crisp", "showers are likely this afternoon", "the pressure is falling quickly",
        "it was the wettest spring on record", "bring an umbrella for the afternoon", "the temperature hit forty degrees",
        "icy conditions are expected at dawn",
    ],
    "sports": [
        "the team won the championship game", "she scored twice in the second half", "the match ended in a draw",
        "the striker signed a new contract", "the coach was fired after the loss", "he ran the marathon in record time",
        "the goalkeeper saved a penalty", "the playoffs begin next week", "the pitcher threw a perfect game",
        "our club moved to first place", "the referee showed a red card", "the tennis final went to five sets",
        "the quarterback threw three touchdowns", "fans celebrated the late winner", "the cyclist won the mountain stage",
        "the league suspended two players", "the home side dominated possession", "he hit a home run in the ninth",
        "the sprinter broke the world record", "the rookie scored his first goal", "the team lost on penalties",
        "the swimmer won three gold medals", "the boxer won by knockout", "the season opener is on saturday",
        "the captain lifted the trophy", "the defense held them scoreless", "she served an ace to win the set",
        "the transfer fee was a club record", "the golfer sank a long putt", "the race was stopped after a crash",
        "the midfielder was injured in training", "the olympic team was announced", "the coach changed the lineup",
        "the skier won the downhill race", "they scored in extra time", "the derby sold out in minutes",
        "the batter struck out twice", "the team trained in the rain", "the point guard scored thirty points",
        "the relay team took silver",
    ],
    "cooking": [
        "chop the onions and fry them in butter", "bake the bread for forty minutes", "add a pinch of salt to the soup",
        "whisk the eggs with sugar until pale", "simmer the sauce for twenty minutes", "roast the chicken with garlic",
        "knead the dough until it is smooth", "season the steak with pepper", "stir in the cream at the end",
        "preheat the oven to two hundred degrees", "grate the cheese over the pasta", "boil the potatoes until tender",
        "marinate the fish in lemon juice", "fold the flour into the batter", "slice the tomatoes thinly",
        "let the cake cool before icing", "toast the spices in a dry pan", "the recipe needs fresh basil",
        "melt the chocolate over hot water", "drain the noodles and rinse them", "grill the vegetables on high heat",
        "mix the yogurt with chopped mint", "cover the pot and cook slowly", "peel and dice the carrots",
        "brush the pastry with beaten egg", "reduce the wine by half", "fry the rice with soy sauce",
        "the stew tastes better the next day", "sprinkle sugar on the berries", "beat the butter and sugar together",
        "steam the dumplings for ten minutes", "squeeze lime over the tacos", "add the garlic at the last minute",
        "the dough must rest for an hour", "blend the soup until smooth", "sear the meat before braising",
        "pour the batter into a greased tin", "garnish the dish with parsley", "caramelize the onions slowly",
        "serve the curry with warm rice",
    ],
}

HELD_OUT: dict[str, list[str]] = {
    "weather": [
        "snow showers will reach the hills tonight", "the wind will pick up after lunch",
        "expect clear skies and a cold night", "a severe storm hit the town", "the rain should stop by morning",
        "it is foggy near the airport", "the forecast shows a warm weekend", "freezing rain made the roads slippery",
        "a heat advisory is in effect", "the clouds cleared in the evening", "thunder rolled across the plains",
        "the week will be wet and windy", "a light frost is likely at dawn", "the drought has dried the rivers",
    ],
    "sports": [
        "the visitors scored a late equalizer", "the champion defended her title", "the team announced a new coach",
        "he scored from a free kick", "the final whistle sparked celebrations", "the runner won the hundred meters",
        "the club sold its best defender", "the game went into overtime", "the pitcher struck out ten batters",
        "the fans booed the referee", "she won the tournament in straight sets", "the team clinched a playoff spot",
        "the goalkeeper kept a clean sheet", "the cyclist crashed on the final lap",
    ],
    "cooking": [
        "fry the garlic until golden", "bake the cookies until the edges brown", "add the herbs to the sauce",
        "cut the butter into small cubes", "simmer the beans for an hour", "roast the peppers until charred",
        "whisk the dressing with olive oil", "season the soup with salt and pepper", "the cake needs two eggs",
        "stir the risotto often", "chill the dough before rolling", "slice the bread and toast it",
        "boil the pasta in salted water", "mix the flour with baking powder",
    ],
}


def split(part: dict[str, list[str]]) -> tuple[list[str], list[int]]:
    """(texts, label ids) of TRAIN or HELD_OUT."""
    texts, labels = [], []
    for label, lines in part.items():
        texts += lines
        labels += [LABELS.index(label)] * len(lines)
    return texts, labels
