"""What every deploy/tools/manifests*.py check shares: reading manifests, naming objects,
collecting failures."""

import yaml


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ident(obj):
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{obj.get('kind', '?')}/{ns + '/' if ns else ''}{name}"


class Failures:
    def __init__(self):
        self.items = []

    def add(self, path, obj, msg):
        self.items.append(f"{path}: {ident(obj) if obj else '-'}: {msg}")

    def finish(self, ok_line):
        for line in self.items:
            print(f"FAIL {line}")
        if self.items:
            print(f"{len(self.items)} problem(s)")
            return 1
        print(ok_line)
        return 0


def find(objs, kind, name):
    return next((o for o in objs if o.get("kind") == kind
                 and o.get("metadata", {}).get("name") == name), None)
