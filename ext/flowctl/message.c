/* message.c — being written. */
#include "flowctl.h"

void
init_flowctl_message(void)
{
}
