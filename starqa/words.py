"""Plain English word lists for generated text (starqa eval's synthetic tasks, the retrieval-head calibration):
needle keys (adjective-noun, as RULER's "words" keys) and the vocabulary of the common-words-extraction lists.
Hand-written for this project; all lowercase, alphabetic, distinct. """

from __future__ import annotations

ADJECTIVES = """
able absent abundant acid active adorable afraid agile alert alive ample ancient angry annual anxious arctic
ashamed awake awful bad bare basic bitter black bland blue bold bored brave brief bright brisk broad broken
brown busy calm careful cheap cheerful chilly civil classic clean clever close cloudy coarse cold common cool
cozy crazy crisp crooked cruel curious curly damp dark dear deep dense dim dirty dizzy dry dull dusty eager
early easy elder empty equal even exact exotic faint fair fancy far fast fierce filthy fine firm flat fluffy
fond formal fragile free fresh friendly frozen full funny fuzzy gentle giant glad glossy golden good grand
grateful gray great green grim gritty handy happy hard harsh heavy helpful hidden high hollow honest hot huge
humble hungry icy idle jolly juicy keen kind large late lazy lean light little lively lonely long loose loud
lovely low loyal lucky mad main massive mean mellow merry mild minor misty modern moist mute narrow nasty neat
nervous new nice noble noisy normal odd old open orange pale patient plain pleasant plump polite poor premium
proud pure purple quick quiet rapid rare raw ready real red rich rigid ripe rough round royal rude rusty sad
safe salty sandy scarce secret sharp shiny short shy silent silly silver simple sleepy slim slow small smart
smooth soft solid sour spare spicy stable steady steep stiff stormy strange strict strong sturdy subtle sudden
sunny super sweet swift tall tame tender thick thin tidy tight tiny tired tough tricky true ugly unique upbeat
urban useful usual vague vast violet vivid warm weak wealthy weary wet white whole wide wild wise witty wooden
worn yellow young zealous
""".split()

NOUNS = """
acorn actor airport album alley anchor angle ankle apple apron arch arena arrow artist attic autumn avenue
badge bakery balcony ball banana band banjo barn basket beach beacon bean beard bell belt bench berry bicycle
bird blanket blossom boat bolt bonnet book boot bottle boulder bowl box bracelet branch bread brick bridge
broom brush bucket buffalo bugle bush butter button cabin cable cactus cake camel camera canal candle canoe
canyon captain carpet carrot castle cat cellar chair chalk channel cheese cherry chest chimney church circle
citizen clam cliff clock cloud coat cobweb coffee collar comet compass cookie copper corner cottage cotton
county cousin crab cradle crane crayon creek cricket crown cupboard curtain cushion daisy dancer desert desk
diamond dinner doctor dog dolphin donkey door dragon drawer dream drum duck eagle earth easel elbow engine
falcon farmer feather fence ferry field finger fire flag flame flute fog forest fork fountain fox frog garage
garden gate giraffe glacier glove goat goose grape grass guitar hammer harbor hat hazel helmet hill honey
horse hotel island jacket jelly jewel journal kettle key kitten ladder lake lamp lantern lawn leaf lemon
letter library lighthouse lily lion lizard lobster locket magnet mango maple market meadow melon mill mirror
mitten monkey moon mountain mouse mug museum needle nest notebook nut oak ocean olive onion orchard otter owl
paddle palace panda paper parrot peach pear pebble pencil pepper piano pigeon pillow pilot pine planet plum
pocket pond poppy potato puddle pumpkin puppet quilt rabbit radio raft rain raven ribbon river robin rocket
roof rose saddle sailor salad sand scarf school scooter seal shadow sheep shell shore shovel silk skate sled
snail snow sock sofa soup sparrow spider spoon squirrel stable stamp star statue stone storm stove stream
street sugar suitcase summer sunset swan sweater table teapot temple tent thistle thunder ticket tiger timber
toast tomato tower tractor trail train tree trumpet tulip tunnel turtle umbrella valley vase village violin
wagon walnut wallet walrus wand water whale wheat wheel whistle willow window winter wolf wool yacht yard
zebra
""".split()

VERBS = """
accept admire agree allow answer appear arrange arrive bake balance bathe beg behave bless boil borrow bounce
breathe brush bump calculate camp carve change chase check chew clap clean collect comb compare complain count
crawl cross cycle dance decide deliver depend describe divide double drag dream dress drift drop dust earn
enjoy enter escape explain fasten fetch fill film fix float flow fold follow gather glow grab greet grin guard
guess hammer hang harvest heat help hover hug hum hunt hurry imagine invent iron jog join juggle jump kneel
knit knock label land laugh launch learn lift listen load march marry measure melt mend mix nod obey offer
open order paddle paint park pause peel pick plant play polish pour pray print pull punch push race rain
reach relax remember repair rescue rest return rhyme rinse roast roll rush sail scatter scrub search serve
settle shape share shiver shop sketch skip slide smile sneeze sniff solve sort spark spell spill splash spray
squeeze stamp stare steer stir stitch stretch stroll sweep swim swing tap taste teach tickle tie tour trace
trade train travel tremble trot tug tumble twist unite unlock vanish visit wade wander wash watch wave weave
whisper whistle wink wobble wonder work worry wrap yawn yell zoom
""".split()


def cwe_vocabulary() -> list[str]:
    """Distinct words for the common-words lists, in a fixed order (samples draw from it with their own RNG)."""
    seen: dict[str, None] = {}
    for word in NOUNS + ADJECTIVES + VERBS:
        seen.setdefault(word, None)
    return list(seen)
