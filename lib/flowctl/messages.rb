# frozen_string_literal: true

module Flowctl
  # obsrvr.flow.controlplane
  module ControlPlane; end
  # obsrvr.flow.processor
  module Processor; end
  # obsrvr.flow.common
  module Common; end
  # flowctl.v1: the protocol the deployed flowctl control plane and `flowctl run` speak
  module V1; end
  # google.protobuf: the well-known types (Timestamp fields read as Time) and descriptor.proto
  module Protobuf; end
  # grpc.health.v1: the standard health checking service
  module Grpc
    module Health
      module V1; end
    end
  end

  # Proto package -> Ruby module of the built-in protocols. Every message and enum of these
  # packages is a class (module) under it, built from lib/flowctl/protocols.pb.
  PACKAGES = {
    "obsrvr.flow.controlplane" => ControlPlane,
    "obsrvr.flow.processor" => Processor,
    "obsrvr.flow.common" => Common,
    "flowctl.v1" => V1,
    "google.protobuf" => Protobuf,
    "grpc.health.v1" => Grpc::Health::V1
  }.freeze

  # Methods of every enum module (Flowctl::Common::HealthStatus, ...):
  #   HealthStatus::HEALTHY         # => 2
  #   HealthStatus.name(2)          # => :HEALTHY
  #   HealthStatus.value(:HEALTHY)  # => 2
  module Enum
    # The Symbol name of a number, or nil when the enum has no such value.
    def name(number = nil)
      return super() if number.nil?

      @by_number[number]
    end

    # The number of a name (Symbol or String); ArgumentError when there is no such value.
    def value(name)
      key = name.is_a?(String) ? name.to_sym : name
      raise TypeError, "#{self}.value takes a Symbol or String (given #{name.class})" unless key.is_a?(Symbol)

      @by_name.fetch(key) { raise ArgumentError, "#{self} has no value #{name.inspect} (values: #{@by_name.keys.join(', ')})" }
    end

    # { NAME: number, ... }
    def values = @by_name

    attr_reader :descriptor_name
  end
end

require_relative "service"
require_relative "descriptors"

module Flowctl
  # descriptor.proto's classes (Flowctl::Protobuf::FileDescriptorSet, ...) read descriptor
  # sets; then the built-in protocols are loaded as a user's descriptor set is.
  Native.define_bootstrap(Protobuf)
  Descriptors.bootstrap
  Descriptors.load(File.binread(File.expand_path("protocols.pb", __dir__)), packages: PACKAGES)
end
