# Pre-emption for mim jobs under SLURM, sourced by scripts/slurm/pretrain.sbatch (and its test).
#
# SLURM sends the batch shell SIGUSR1 some time before the end (#SBATCH --signal=B:USR1@120).
# The trap passes it on to every process of the running step (scancel --signal=USR1), where
# mim turns it into "save a checkpoint at the next update boundary and exit 143"; the launchers
# ignore it (mim_slurm_task). Once the step has ended, a job stopped this way requeues itself
# (scontrol requeue) and the next run resumes exactly with run.resume=auto.

mim_slurm_stop_requested=0
mim_slurm_step_pid=""

mim_slurm_master_addr() {
    # The first node of the allocation: where process 0 (the rendezvous) runs.
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

mim_slurm_on_signal() {
    mim_slurm_stop_requested=1
    echo "mim-slurm: pre-emption signal; asking job $SLURM_JOB_ID to checkpoint and stop" >&2
    scancel --signal=USR1 "$SLURM_JOB_ID"
}

mim_slurm_run() {
    # Run the step ("$@", an srun command) in the background so the trap can fire, wait for
    # it to end, then requeue if a signal stopped it. Returns the step's status otherwise.
    trap mim_slurm_on_signal USR1
    "$@" &
    mim_slurm_step_pid=$!
    local status=0
    while true; do
        wait "$mim_slurm_step_pid" && status=0 || status=$?
        kill -0 "$mim_slurm_step_pid" 2>/dev/null || break  # wait was cut short by the trap
    done
    trap - USR1
    if [[ $mim_slurm_stop_requested == 1 ]]; then
        echo "mim-slurm: step ended ($status) after the signal; requeueing job $SLURM_JOB_ID" >&2
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}
