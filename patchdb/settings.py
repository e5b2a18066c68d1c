"""Which recorded settings differ: what a store or a run folder names when it refuses other settings."""


def differing_keys(settings: dict, other: dict) -> list[str]:
    """The keys whose values differ between two mappings of settings, in order; nested mappings are compared key by key
    and their keys named 'outer.inner'; a key that only one of them holds differs."""
    changed = []
    for key in dict.fromkeys([*settings, *other]):
        value, other_value = settings.get(key), other.get(key)
        if isinstance(value, dict) and isinstance(other_value, dict):
            changed += [f"{key}.{inner}" for inner in differing_keys(value, other_value)]
        elif key not in settings or key not in other or value != other_value:
            changed.append(key)
    return changed
