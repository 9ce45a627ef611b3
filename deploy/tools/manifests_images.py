"""`manifests.py images|dockerfile|build-context`: images named by deploy/images, one binary per
image target, and a build context without keys."""

import os
import re

from manifests_lib import Failures, load


EASTWEST_BINARIES = ("eastwest-proxy", "eastwest-control", "eastwest-bench", "eastwest-certs")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def image_ref(entry):
    """The reference kustomize renders for an `images:` entry."""
    ref = entry.get("newName", entry["name"])
    if entry.get("newTag"):
        ref += f":{entry['newTag']}"
    return f"{ref}@{entry['digest']}" if entry.get("digest") else ref


def pod_containers(obj):
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("initContainers", []) + pod.get("containers", [])


def cmd_images(args):
    """Every container that runs an eastwest binary has the image deploy/images names for that
    binary (so one edit there moves every overlay), every other image has a tag other than
    latest or a digest, and the component's own entries are well-formed."""
    fails = Failures()
    component = os.path.join(args.component, "kustomization.yaml")
    entries = {e["name"]: e for e in load(component)[0].get("images", [])}
    for name, entry in entries.items():
        if not (entry.get("newTag") or entry.get("digest")):
            fails.add(component, None, f"image {name}: needs newTag or digest")
        if entry.get("digest") and not DIGEST.match(entry["digest"]):
            fails.add(component, None, f"image {name}: digest {entry['digest']!r} is not sha256:<64 hex>")
    wanted = {b: image_ref(entries[b]) for b in EASTWEST_BINARIES if b in entries}
    used = set()
    checked = 0
    for path in args.files:
        for obj in load(path):
            for c in pod_containers(obj):
                checked += 1
                image = c.get("image", "")
                binary = os.path.basename((c.get("command") or [""])[0])
                if binary in EASTWEST_BINARIES:
                    used.add(binary)
                    if image != wanted.get(binary):
                        fails.add(path, obj, f"container {c['name']} runs {binary} from image {image!r}, "
                                             f"not {wanted.get(binary)!r} (deploy/images)")
                    continue
                last = image.rsplit("/", 1)[-1]
                if "@" in last:
                    if not DIGEST.match(last.split("@", 1)[1]):
                        fails.add(path, obj, f"container {c['name']}: bad digest in {image!r}")
                elif ":" not in last or last.endswith(":latest"):
                    fails.add(path, obj, f"container {c['name']}: image {image!r} needs a fixed tag")
    for binary in sorted(set(wanted) - used - {"eastwest-certs"}):
        fails.add(component, None, f"image {binary} is named but no rendered container runs {binary}")
    return fails.finish(f"{checked} containers: every image is the one deploy/images names, or pinned")


def dockerfile_stages(path):
    """(global ARG defaults, [(stage name, base, [instructions])]) of a Dockerfile; continuation
    lines joined, comments dropped."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", "".join(l for l in f if not l.lstrip().startswith("#")))
    global_args, stages = {}, []
    for line in (l.strip() for l in text.splitlines() if l.strip()):
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            stages.append((m.group(2) or "", m.group(1), []))
        elif word == "ARG" and not stages:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = default.strip()
        elif stages:
            stages[-1][2].append((word, rest))
    return global_args, stages


def cmd_dockerfile(args):
    fails = Failures()
    global_args, stages = dockerfile_stages(args.file)
    names = [n for n, _, _ in stages]
    for name, base, _ in stages:
        m = re.fullmatch(r"\$\{?(\w+)\}?", base)
        if base not in names and not (m and m.group(1) in global_args):
            fails.add(args.file, None, f"stage {name or '?'}: FROM {base} is neither an earlier stage "
                                       "nor a build argument (so it cannot be pinned by digest)")
    for arg, default in global_args.items():
        ref, _, digest = default.partition("@")
        if ":" not in ref.rsplit("/", 1)[-1]:
            fails.add(args.file, None, f"ARG {arg}={default}: needs a tag")
        if digest and not DIGEST.match(digest):
            fails.add(args.file, None, f"ARG {arg}: digest {digest!r} is not sha256:<64 hex>")
    build_env = " ".join(rest for n, _, ins in stages for word, rest in ins if word in ("ENV", "RUN") and n == "build")
    if "CARGO_PROFILE_RELEASE_STRIP=symbols" not in build_env:
        fails.add(args.file, None, "the build stage must strip the binaries (CARGO_PROFILE_RELEASE_STRIP=symbols)")
    if not names or names[-1] != "eastwest-proxy":
        fails.add(args.file, None, "the last stage (the default target) must be eastwest-proxy")
    for binary in ("eastwest-proxy", "eastwest-control", "eastwest-bench"):
        stage = next((ins for n, _, ins in stages if n == binary), None)
        if stage is None:
            fails.add(args.file, None, f"no target {binary}")
            continue
        copied = [os.path.basename(src) for word, rest in stage if word == "COPY"
                  for src in rest.split()[:-1] if not src.startswith("--")]
        if copied != [binary]:
            fails.add(args.file, None, f"target {binary} must copy only {binary}, copies {copied}")
        entry = [rest for word, rest in stage if word == "ENTRYPOINT"]
        if not entry or binary not in entry[-1]:
            fails.add(args.file, None, f"target {binary}: ENTRYPOINT must run {binary}")
        if not any(word == "USER" and not rest.startswith("0") for word, rest in stage):
            fails.add(args.file, None, f"target {binary}: needs a non-root USER")
    return fails.finish(f"{args.file}: {len(stages)} stages, one binary per image, stripped, pinnable bases")


def cmd_build_context(args):
    """eastwest-certs writes root keys; the READMEs must not have users write them inside the
    repository (the Docker build context), and .dockerignore keeps key files out anyway."""
    fails = Failures()
    with open(args.dockerignore, encoding="utf-8") as f:
        ignored = {l.strip() for l in f if l.strip() and not l.startswith("#")}
    for pattern in ("**/*.pem", "**/*.key"):
        if pattern not in ignored:
            fails.add(args.dockerignore, None, f"must ignore {pattern}")
    outs = 0
    for readme in args.readme:
        with open(readme, encoding="utf-8") as f:
            text = re.sub(r"\\\n", " ", f.read())
        dirs = {m.group(1): m.group(2).strip("\"'") for m in re.finditer(r"export (\w+)=(\S+)", text)}
        for line in text.splitlines():
            if "eastwest-certs " not in line:
                continue
            for out in re.findall(r"--out[= ](\S+)", line):
                outs += 1
                var = re.match(r"[\"']?\$\{?(\w+)", out)
                root = dirs.get(var.group(1), "") if var else out
                if not (root.startswith(("$HOME", "~", "/")) and not root.startswith(("/work", "/src"))):
                    fails.add(readme, None, f"eastwest-certs --out {out}: must be outside the repository "
                                            f"(an absolute or $HOME path, or a variable exported as one)")
    return fails.finish(f"{outs} eastwest-certs --out paths outside the build context; key files ignored")
