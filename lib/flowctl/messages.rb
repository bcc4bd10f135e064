# frozen_string_literal: true

module Flowctl
  # obsrvr.flow.controlplane
  module ControlPlane; end
  # obsrvr.flow.processor
  module Processor; end
  # obsrvr.flow.common
  module Common; end

  # Proto package -> Ruby module. Every message and enum of these packages becomes a
  # class (module) under it, built from its protobuf-c descriptor.
  PACKAGES = {
    "obsrvr.flow.controlplane" => ControlPlane,
    "obsrvr.flow.processor" => Processor,
    "obsrvr.flow.common" => Common
  }.freeze

  Native.define_messages(PACKAGES)
end
