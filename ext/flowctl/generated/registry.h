/* Every descriptor protoc-c generated, NULL-terminated (registry.c is written by `rake proto`, tasks/registry.rb). */
#ifndef FLOWCTL_REGISTRY_H
#define FLOWCTL_REGISTRY_H
#include <protobuf-c/protobuf-c.h>

extern const ProtobufCMessageDescriptor *const flowctl_registry_messages[];
extern const ProtobufCEnumDescriptor *const flowctl_registry_enums[];
extern const ProtobufCServiceDescriptor *const flowctl_registry_services[];
/* google/protobuf/descriptor.proto: the classes that read descriptor sets */
extern const ProtobufCMessageDescriptor *const flowctl_bootstrap_messages[];
extern const ProtobufCEnumDescriptor *const flowctl_bootstrap_enums[];

#endif
