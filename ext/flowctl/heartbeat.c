/* heartbeat.c — placeholder until it is written. */
#include "flowctl.h"

void
init_flowctl_heartbeat(void)
{
}
