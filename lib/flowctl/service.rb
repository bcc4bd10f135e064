# frozen_string_literal: true

module Flowctl
  # A gRPC service of the flow protocol, built from its protobuf-c service descriptor.
  #
  #   Flowctl::ControlPlane::Service.rpcs.map(&:method_name)
  #   # => [:register_processor, :processor_heartbeat, ...]
  class Service
    # The streaming shape of every RPC: protobuf-c does not record it, so it is declared
    # here and only here. RPCs not listed are unary.
    STREAMING = {
      "obsrvr.flow.processor.ProcessorService/Process" => :bidi
    }.freeze

    # One RPC: name ("RegisterProcessor"), method_name (:register_processor),
    # path ("/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor"), the message
    # classes, and its shape (:unary or :bidi).
    RPC = Struct.new(:name, :method_name, :path, :request_class, :response_class, :shape) do
      def unary? = shape == :unary
      def bidi? = shape == :bidi
    end

    attr_reader :full_name, :rpcs

    def initialize(full_name, methods)
      @full_name = full_name.freeze
      @rpcs = methods.map { |name, input, output| build_rpc(name, input, output) }.freeze
      @by_path = @rpcs.to_h { |r| [r.path, r] }.freeze
      @by_method = @rpcs.to_h { |r| [r.method_name, r] }.freeze
      freeze
    end

    # The RPC for a path ("/pkg.Service/Method") or a method name (:register_processor).
    def rpc(key)
      key.is_a?(Symbol) ? @by_method[key] : @by_path[key]
    end

    def inspect
      "#<Flowctl::Service #{full_name} rpcs: #{rpcs.map(&:name).join(', ')}>"
    end

    def self.underscore(name)
      name.gsub(/([a-z\d])([A-Z])/, '\1_\2').gsub(/([A-Z]+)([A-Z][a-z])/, '\1_\2').downcase
    end

    private

    def build_rpc(name, input, output)
      key = "#{full_name}/#{name}"
      RPC.new(name.freeze, Service.underscore(name).to_sym, "/#{key}".freeze,
              Native.message_class(input), Native.message_class(output),
              STREAMING.fetch(key, :unary)).freeze
    end
  end

  Native.services.each do |full_name, methods|
    package = full_name.rpartition(".").first
    mod = PACKAGES[package] or next
    mod.const_set(:Service, Service.new(full_name, methods))
  end
end
