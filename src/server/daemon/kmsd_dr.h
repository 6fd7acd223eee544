/*
 * Offline disaster-recovery subcommands of kmsd (dr_cmd.c):
 *   kmsd recover --config FILE [--members ID,ID...] [--yes-i-understand]
 *   kmsd restore --snapshot FILE --config FILE [--force]
 * Main thread only, with no daemon running in this process.
 */
#ifndef KMSD_DR_H
#define KMSD_DR_H

#include <stdbool.h>

/* True when argv[1] names a subcommand handled here. */
bool kmsd_dr_is_subcommand(int argc, char **argv);

/* Runs the subcommand argv[1]; returns the process exit code (0 done,
 * 1 usage/configuration error or refusal, 2 failure). */
int kmsd_dr_main(int argc, char **argv, char **envp);

#endif /* KMSD_DR_H */
