"""Numbering of the cluster's collective calls, shared by workers and node servers: the
workers' barrier() generations, and the phases of a save() (adapm.node.control.
checkpoint_phases says what each phase holds still) with their cluster barriers."""

BEGIN, FREEZE, WRITTEN, THAW = 1, 2, 3, 4
PHASES = (BEGIN, FREEZE, WRITTEN, THAW)
PHASE_NAMES = {BEGIN: "begin", FREEZE: "freeze", WRITTEN: "written", THAW: "thaw"}
# Cluster barriers (NODE_BARRIER generations) of checkpoint phases lie above every
# generation of the workers' own barriers, which count from 1.
GENERATION_BASE = 1 << 48
MAX_SAVES = 1 << 40


def barrier_generation(save, phase):
    return GENERATION_BASE + save * 8 + phase


def is_checkpoint_generation(generation):
    return generation >= GENERATION_BASE


def describe_generation(generation):
    """What a cluster barrier is: the workers' barrier() or a phase of their save()."""
    if not is_checkpoint_generation(generation):
        return f"barrier() number {generation}"
    save, phase = divmod(generation - GENERATION_BASE, 8)
    return f"save() number {save} (phase {PHASE_NAMES.get(phase, phase)})"
