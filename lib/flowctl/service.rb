# frozen_string_literal: true

module Flowctl
  # A gRPC service, built from its descriptor (Flowctl::Descriptors) or declared in Ruby.
  #
  #   Flowctl::ControlPlane::Service.rpcs.map(&:method_name)
  #   # => [:register_processor, :processor_heartbeat, ...]
  class Service
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

    # methods: [[name, input_type, output_type, shape], ...] with full proto type names and
    # a shape of SHAPES (:unary when left out).
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
      shape ||= :unary
      raise ArgumentError, "#{key}: shape must be one of #{SHAPES.inspect} (given #{shape.inspect})" unless SHAPES.include?(shape)

      RPC.new(name.freeze, Service.underscore(name).to_sym, "/#{key}".freeze,
              Native.message_class(input), Native.message_class(output), shape).freeze
    end
  end
end
