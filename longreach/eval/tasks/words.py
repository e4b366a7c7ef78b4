"""Small fixed word lists for keys and values (offline; the order is part of the seeds)."""

WORDS = (
    "apple anchor badge bamboo barrel beacon bicycle blanket bottle bucket cabin candle "
    "canyon carpet castle cedar chalk cherry circle cliff cloud comet copper cotton crystal "
    "desert diamond dolphin dragon eagle ember engine falcon feather fiddle forest fossil "
    "garden garlic glacier granite harbor hammer helmet island ivory jacket jasmine jungle "
    "kettle ladder lantern lemon marble meadow mirror monkey needle oasis orbit orchid "
    "paddle parrot pebble pepper pillow planet pocket puzzle quartz rabbit raven ribbon "
    "river rocket saddle salmon shadow silver spider spoon summit tablet teapot thunder "
    "timber tomato tunnel turtle velvet violin walnut whistle window winter wizard zebra"
).split()


def distinct_numbers(rng, n: int) -> list[str]:
    """``n`` different 5-digit numbers, as strings (the values needles point to)."""
    values: list[str] = []
    while len(values) < n:
        value = str(int(rng.integers(10_000, 100_000)))
        if value not in values:
            values.append(value)
    return values
