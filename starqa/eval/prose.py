"""Original essay prose that the RULER-style suite uses as a real-text haystack (niah_single_2/3, multi-key, ...).

Written for this project (no third-party text), kept as a Python string so it ships with the package without any
package-data configuration. The prose is deliberately free of digits and of the phrase the needles use, so a planted
value can only come from its needle. Paragraphs are separated by blank lines; `paragraphs()` returns them in order.
"""

from __future__ import annotations

ESSAYS = """\
There is a particular kind of attention that only walking allows. On foot, a city stops being a map of destinations and becomes a sequence of small discoveries: a doorway painted a colour nobody would choose twice, a bakery that opens before the trams start running, a courtyard that is visible for exactly four steps and then hidden again. The pace of walking matches the pace of noticing. A bicycle is already too fast for most of it, and a car turns the whole street into a blur of signs and obstacles.

People who walk the same route every day often say that they no longer see it, but that is rarely true. What happens instead is that the route becomes a kind of background against which every change stands out. A new crack in the pavement, a shop with its shutters down on a weekday, a tree that has been pruned too hard: these register immediately, the way a wrong note registers in a song you know by heart. Familiarity does not dull perception so much as sharpen it for differences.

The best walks have no purpose at all. When there is an errand at the end of the route, the mind runs ahead to it and the street becomes a corridor. When there is nothing to do, the mind stays where the feet are. This is why so many writers have described long aimless walks as the place where their ideas arrived. It is not that walking produces ideas, exactly. It is that walking removes the pressure to produce them, and ideas, like cats, tend to come when they are not being called.

Baking bread teaches patience in a way that few other household tasks do. The recipe is short: flour, water, salt and yeast. Almost everything else is time. The dough has to rest before it can be shaped, rise again after it is shaped, and cool after it leaves the oven before it can be cut. Each of these waits is essential, and each is tempting to shorten. A loaf cut too early is gummy in the middle; a loaf shaped too early tears instead of stretching.

Beginners often assume that good bread depends on kneading hard and long. In practice, gentle folding at intervals does nearly the same work, because the gluten develops on its own while the dough sits. What matters more is temperature. A warm kitchen makes a fast, shallow rise and a bland loaf; a cool one makes a slow rise with deeper flavour. Many bakers end up keeping their dough in a cold cellar or the bottom of the refrigerator overnight, simply to give it more time.

The smell of baking bread is said to make houses easier to sell, and it is not hard to see why. It suggests a household where someone has time to wait for things, where mornings are unhurried and the kitchen is used for more than reheating. Whether that impression is accurate hardly matters. The smell is a promise about a way of living, and people are willing to pay for promises.

An old bicycle is one of the most repairable machines a person can own. Nearly every part can be reached with a handful of ordinary tools, and nearly every fault announces itself clearly. A chain that skips, a brake that squeals, a wheel that rubs against the frame: each of these has a small number of likely causes, and each cause can be checked in a few minutes. This clarity is rare in modern objects, most of which hide their workings behind sealed panels and proprietary screws.

Learning to true a wheel is a small lesson in systems thinking. Tightening one spoke pulls the rim toward its side of the hub, but it also changes the tension on its neighbours, and a correction made too eagerly in one place creates a new wobble somewhere else. The skill lies in making many small adjustments, checking after each one, and resisting the urge to fix everything at once. Experienced mechanics talk about listening to the wheel, which sounds mystical until you have done it for an afternoon.

There is a quiet satisfaction in riding something you have repaired yourself. Every rattle becomes meaningful, because you know what is making it. Every smooth gear change feels earned. The bicycle stops being a product and becomes a companion whose moods you understand. That relationship is hard to build with any machine whose insides are closed to you.

Maps have always been arguments as much as descriptions. Every map decides what to show and what to leave out, which way is up, what is at the centre and what is pushed to the margins. Old maps of the world placed the mapmaker's own country in the middle and let distant coasts dissolve into decorative sea monsters. Modern maps are more careful, but they still choose: a road map hides the footpaths, a transit map bends the streets into tidy diagonals, and a political map paints borders that no traveller could see on the ground.

Perhaps the most honest maps are the ones people draw for each other by hand. A sketch on the back of an envelope showing the way to a friend's house includes only what matters for that journey: the petrol station where you turn left, the church you should not mistake for the school, the gate that is always open. Such maps are useless for any other purpose, and perfect for their own. They remind us that a map is a tool for a task, not a copy of the world.

The arrival of maps on telephones changed how people move through cities. It is now possible to reach any address without ever forming a picture of the neighbourhood around it. Some people welcome this freedom; others feel that something has been lost, that a city known only through a moving blue dot is not really known at all. Both views have merit. The important thing may be to notice which kind of knowing you want on a given day, and to put the telephone away when the answer is the slower kind.

Lighthouses were once among the most advanced machines of their age. Their lenses gathered the light of a modest flame and threw it many miles out to sea, and their rotating mechanisms gave each tower a distinctive rhythm of flashes so that sailors could tell one coast from another in the dark. Keeping them running required a keeper who lived at the tower, trimmed the wick, wound the clockwork and polished the glass every day, whatever the weather.

The life of a lighthouse keeper has been romanticised in novels and paintings, but the reality was mostly routine and isolation. Keepers kept detailed logs of the weather, the ships that passed and the supplies that arrived. Many of those logs survive, and they are strangely moving to read: page after page of careful handwriting recording wind direction and visibility, interrupted now and then by a single line about a storm, a shipwreck or a child born on the island.

Today nearly all lighthouses are automated, and many have been replaced by satellite navigation altogether. Some towers have become museums or holiday cottages; others stand empty, their lamps dark. Yet people still travel to see them. There is something reassuring about a structure whose only purpose was to keep strangers safe, built in a place where no one would otherwise have chosen to build anything.

A public library is one of the few places left where a person can spend the whole day without being expected to buy something. That alone makes it unusual. Add to it the shelves of books, the reading tables, the warmth in winter and the quiet, and it becomes something close to a civic living room. Libraries are used by students, by people looking for work, by parents with small children, by retired readers and by travellers waiting for a train.

Librarians are often underestimated. Their work is not only to lend books but to help people find what they are looking for, and frequently to help them work out what they are looking for in the first place. A good reference question rarely arrives in its final form. Someone asks for a book about boats and turns out to need the rules for registering a small sailing dinghy, or the history of a particular shipyard where a grandparent once worked.

The catalogue of a large library is itself a remarkable object. It is an attempt to describe everything in the collection so precisely that any item can be found again, and so consistently that related items end up near each other. The subject headings, the shelf marks and the cross references add up to a model of human knowledge, always incomplete and always being revised. Browsing it can be as absorbing as browsing the shelves.

Gardening is an exercise in working with forces you do not control. The gardener chooses what to plant and where, prepares the soil and pulls the weeds, but the weather, the insects, the birds and the plants themselves all have their own plans. A bed that thrived last summer may sulk this year for no visible reason, while a seedling dropped by accident in a crack in the path grows into the healthiest plant in the garden.

Experienced gardeners learn to observe before they act. They watch where the frost lingers in the morning, which corners stay damp after rain, where the afternoon shade falls in late summer. Over years this knowledge accumulates into an intimate understanding of one small piece of ground. It cannot be transferred by reading; it has to be earned by attention, season after season.

The rewards of a garden are often small and unpredictable: the first pea pods in early summer, a late rose in autumn, the sudden smell of a herb brushed in passing. But they are real, and they arrive regardless of what else is happening in the world. Many people find that tending plants steadies them in difficult times, perhaps because a garden insists so calmly on its own schedule.

Rivers shape the places they flow through in slow, persistent ways. Over centuries they cut valleys, build plains, move their own beds from one side to the other and leave behind curved lakes where old loops have been abandoned. Towns grew up along rivers because rivers offered water, food, power and transport, and many of the oldest streets in those towns still follow the line of a bank that has long since moved.

A river also measures time in its own way. Its level rises with the snowmelt in spring and falls in the dry weeks of late summer. Fishermen, boatmen and millers once knew these rhythms intimately and planned their years around them. Flood marks painted on old walls record the highest waters, each with its year, a quiet history of the moments when the river reminded the town who was older.

Walking along a river is one of the easiest ways to get lost in thought. The path has a natural direction, the water provides a steady sound, and there is always something to watch: a heron waiting in the shallows, a branch turning slowly in the current, the light changing on the surface as clouds pass. It is hard to stay anxious beside moving water for very long.

Handwritten letters have become rare, and their rarity has made them more valuable. A letter takes time to write, costs money to send and arrives days later, all of which signal to the reader that someone thought the effort worthwhile. It can be reread, kept in a drawer, discovered again years later. Messages on a screen are faster and often warmer in the moment, but they seldom survive long enough to be found by anyone else.

The habit of letter writing also shaped how people thought. Writing to a distant friend meant gathering the events of several weeks into a story, choosing what mattered, and explaining it to someone who had not been there. This is a form of reflection, and many people who kept up long correspondences said that they understood their own lives better for having described them to someone else.

Clocks did not only measure time; they changed what time meant. Before mechanical clocks, the day was divided by the sun and the bells of the nearest church, and hours stretched or shrank with the seasons. Once towns installed public clocks, hours became equal, appointments became precise and lateness became a fault. Factories, railways and schools all depended on this new, uniform time, and it is hard now to imagine life without it.

Clockmakers were among the most skilled craftspeople of their day. A good clock required gears cut with great accuracy, springs of consistent strength and a regulating mechanism that could keep a steady beat for weeks. Many of the techniques they developed later found their way into scientific instruments, navigation tools and eventually the first calculating machines. The humble kitchen clock carries a long history of patient invention.

Bees live in a society so organised that it has fascinated observers for thousands of years. A hive divides its work among thousands of individuals: some gather nectar, some guard the entrance, some tend the young and some build the wax comb with astonishing regularity. No single bee directs this activity. The order emerges from simple rules followed by many, which is one reason why bees are studied by people who design traffic systems and computer networks as well as by farmers.

Beekeepers speak of their hives with a mixture of respect and affection. They learn to read the sound of a colony, calm and steady when all is well and sharper when something is wrong. They open the hive slowly, move without haste and accept the occasional sting as part of the work. In return the bees give honey, wax and the pollination of orchards and fields far beyond the beekeeper's own garden.

Bridges are among the most visible expressions of engineering. A good bridge has to carry its own weight and the weight of everything that crosses it, resist the wind and the water, and stand for decades with little more than paint and inspection. The great bridges of the past show how engineers solved these problems with the materials they had: stone arches that push against their foundations, iron trusses that share the load among many slender members, cables that hang in long curves from tall towers.

Small bridges deserve attention too. A footbridge over a stream, a plank laid across a ditch, a stone slab spanning a narrow channel in an old town: these are the bridges most people cross most often, and they are usually built with the same care as their famous relatives, just on a smaller scale. Looking closely at how they are made is a good way to begin understanding the larger ones.

Night trains occupy a special place in the imagination of travellers. You board in one city after dinner, fall asleep to the rocking of the carriage and wake in another country with the morning light coming through the blinds. The journey is slow by the standards of air travel, but it gives back the time it takes, because the hours spent travelling are hours spent sleeping. Many travellers find that they arrive more rested than they left.

The railway station itself is a kind of theatre. Departures and arrivals are announced, crowds gather and disperse, and every platform holds a small drama of greeting or parting. Architects understood this when they designed the great stations of earlier centuries, with their high glass roofs and grand halls. Even a small rural station, with its single bench and painted timetable, carries some of the same sense of occasion.

Museums ask their visitors to slow down, and most visitors refuse. Studies of how people move through galleries suggest that the average visitor spends only a few seconds in front of each painting, often less time than it takes to read the label beside it. Yet the people who do stop, who sit on a bench in front of a single work for a quarter of an hour, often describe the experience as one of the most memorable of their visit.

A good way to visit a large museum is to choose one room and ignore the rest. Trying to see everything produces only fatigue and a blur of half remembered images. Choosing a single room, or even a single object, allows a kind of attention that turns looking into seeing. The rest of the museum will still be there on another day, and the one room will be remembered.

Open air markets have survived supermarkets, shopping centres and the internet, which says something about what they offer. A market is a place to buy food, but it is also a place to talk, to watch and to be surprised. Stallholders know their produce and are often happy to explain where it came from and how to cook it. Regular customers are greeted by name, and newcomers are quickly drawn into conversation.

The rhythm of a market follows the seasons closely. Early summer brings strawberries and young vegetables, late summer brings tomatoes and stone fruit, and autumn brings apples, pumpkins and mushrooms. Shopping at a market teaches this calendar without any effort, and many people who start buying their food there find that they begin to look forward to each season's arrivals in a way that the unchanging shelves of a supermarket never encouraged.

Making tea properly is simple but not trivial. The water should be fresh and heated to the right temperature for the leaf: gentler for green tea, hotter for black. The leaves need room to unfold, and they should steep for a few minutes rather than a few seconds. Done with care, the whole ritual takes little longer than dropping a bag into a mug, but the result tastes noticeably different.

In many cultures the preparation and serving of tea has become a ceremony in its own right, with rules about the order of actions, the choice of cups and the behaviour of host and guests. These ceremonies can seem elaborate to outsiders, but their purpose is simple: to make a shared pause feel deliberate. The tea is almost an excuse for the pause.

Rain changes the character of a city more than any other weather. Streets empty, umbrellas appear, cafes fill up and the sound of traffic softens into a continuous hiss. Reflections double the lights of shops and street lamps, and familiar buildings take on darker, richer colours. Photographers often wait for rain because it turns an ordinary scene into something quieter and stranger.

Some people love rain and some people dread it, and the difference often comes down to what they are wearing. A good coat and sturdy shoes turn a rainy walk into a pleasure; thin shoes and no hood turn it into an ordeal. The weather itself is indifferent. It is our preparation that decides whether a wet afternoon is miserable or memorable.

A paper notebook is a small and forgiving tool for thinking. It accepts anything: lists, sketches, half formed sentences, arrows linking one idea to another. Nothing in it needs to be finished or correct. Unlike a document on a screen, it does not suggest a final shape, and that openness makes it easier to write the first clumsy version of a thought, which is usually the hardest part.

Old notebooks are also a kind of diary, even when they were not meant as one. Paging through them years later reveals what you were worrying about, what you hoped to build, which problems seemed urgent and which quietly disappeared. The handwriting changes with mood and haste. Few records of a life are as honest as the scribbles nobody else was supposed to read.

Woodworking rewards precision and punishes impatience. A joint that is cut slightly too loose will never hold as well as one cut exactly, and a board planed in a hurry will show every tear in its grain. At the same time, wood is a living material that moves with the seasons, swelling in damp weather and shrinking in dry, and a good woodworker plans for this movement rather than fighting it.

The tools of woodworking have changed surprisingly little over centuries. A well made hand plane, a sharp chisel and a fine saw are still the heart of many workshops, even where power tools do most of the heavy cutting. Learning to sharpen these tools is one of the first lessons every apprentice receives, because a dull edge makes every other task harder and more dangerous.

On a clear night far from city lights, the sky holds more stars than most people have ever seen. The band of the galaxy stretches overhead like a pale cloud, and with patience the eye begins to pick out faint details: a fuzzy patch that turns out to be a distant cluster, a slow moving point that is a satellite, a sudden streak of a meteor. Many people who see such a sky for the first time describe a feeling of being very small and, oddly, very much at home.

Learning the constellations is an old and satisfying pastime. Each one comes with stories, sometimes several from different cultures, and each helps to find the others. Once a few familiar shapes are known, the sky stops being a random scattering of lights and becomes a landscape with landmarks, changing slowly through the year as the earth moves along its orbit.

Islands have a particular hold on the imagination. Their boundaries are clear, their communities often close, and their connection to the mainland depends on boats or bridges that can be interrupted by weather. Life on a small island tends to be organised around the ferry timetable, the tides and the supplies that arrive by sea. People who grow up there often speak of a sense of belonging that is hard to find elsewhere.

Visitors to islands are sometimes surprised by how much variety a small place can contain. A single island may hold cliffs and beaches, farmland and moor, a harbour village and a scattering of isolated houses. Walking from one end to the other can take only a day, yet each part has its own character, shaped by the wind, the soil and the people who have lived there.

Practising a musical instrument is a lesson in the value of repetition. A difficult passage played slowly, again and again, gradually becomes easy, and then becomes natural, and finally becomes something the player no longer has to think about. This process cannot be hurried. Practising fast only teaches the fingers to make the same mistakes more quickly.

Good teachers of music know that the aim of practice is not to play a piece many times but to solve its problems one by one. They ask their students to isolate a single bar, to play it with different rhythms, to listen closely to each note. The method is slow, but it produces players who understand what they are doing and can apply the same approach to any new piece they encounter.

Memory is less like a recording and more like a reconstruction. Each time we recall an event, we rebuild it from fragments, filling the gaps with what seems likely, and the rebuilt version is what gets stored again. This is why two people who shared an experience can remember it so differently, and why a story told many times slowly drifts away from what actually happened.

Knowing this can make us more forgiving of our own forgetfulness and of others' mistaken recollections. It can also encourage us to keep records: photographs, notes, letters, the logs of a lighthouse keeper or the scribbles in an old notebook. These do not replace memory, but they anchor it, giving our reconstructions something firm to return to.
"""


def paragraphs() -> list[str]:
    """The essay paragraphs, in order."""
    return [paragraph.strip() for paragraph in ESSAYS.split("\n\n") if paragraph.strip()]
