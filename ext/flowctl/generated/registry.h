/* Every descriptor protoc-c generated for proto/, NULL-terminated (registry.c is written by `rake proto`). */
#ifndef FLOWCTL_REGISTRY_H
#define FLOWCTL_REGISTRY_H
#include <protobuf-c/protobuf-c.h>

extern const ProtobufCMessageDescriptor *const flowctl_registry_messages[];
extern const ProtobufCEnumDescriptor *const flowctl_registry_enums[];
extern const ProtobufCServiceDescriptor *const flowctl_registry_services[];

#endif
