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

  Native.define_messages(PACKAGES)
end
