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

    # The four call shapes of gRPC.
    SHAPES = %i[unary server_streaming client_streaming bidi].freeze

    # One RPC: name ("RegisterProcessor"), method_name (:register_processor),
    # path ("/obsrvr.flow.controlplane.ControlPlane/RegisterProcessor"), the message
    # classes, and its shape (one of SHAPES).
    RPC = Struct.new(:name, :method_name, :path, :request_class, :response_class, :shape) do
      def unary? = shape == :unary
      def bidi? = shape == :bidi
      # the client sends a stream of requests (client streaming or bidi)
      def client_streaming? = shape == :client_streaming || shape == :bidi
      # the server sends a stream of replies (server streaming or bidi)
      def server_streaming? = shape == :server_streaming || shape == :bidi
    end

    attr_reader :full_name, :rpcs

    # methods: [[name, input_type, output_type], ...] with full proto type names; a fourth
    # element gives the shape (one of SHAPES), else STREAMING's entry or :unary.
    def initialize(full_name, methods)
      @full_name = full_name.freeze
      @rpcs = methods.map { |name, input, output, shape| build_rpc(name, input, output, shape) }.freeze
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

    def build_rpc(name, input, output, shape)
      key = "#{full_name}/#{name}"
      shape ||= STREAMING.fetch(key, :unary)
      raise ArgumentError, "#{key}: shape must be one of #{SHAPES.inspect} (given #{shape.inspect})" unless SHAPES.include?(shape)

      RPC.new(name.freeze, Service.underscore(name).to_sym, "/#{key}".freeze,
              Native.message_class(input), Native.message_class(output), shape).freeze
    end
  end

  Native.services.each do |full_name, methods|
    package = full_name.rpartition(".").first
    mod = PACKAGES[package] or next
    mod.const_set(:Service, Service.new(full_name, methods))
  end
end
