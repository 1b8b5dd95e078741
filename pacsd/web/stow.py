"""(being written)"""


def routes(*args) -> list:
    return []
