# frozen_string_literal: true

module Flowctl
  # Client interceptors, in the shape of the official grpc gem's GRPC::ClientInterceptor: one
  # method per call shape, called with keywords, that must `yield` to go on with the call (and
  # return what yield returns, or raise). `metadata` is the call's headers as a mutable Hash:
  # change it before yielding to add or remove headers (tracing ids, auth tokens).
  #
  #   class Timing < Flowctl::ClientInterceptor
  #     def request_response(request:, call:, method:, metadata:)
  #       metadata["x-trace-id"] = SecureRandom.hex(8)
  #       t = Process.clock_gettime(Process::CLOCK_MONOTONIC)
  #       yield
  #     ensure
  #       STATS.record(method, Process.clock_gettime(Process::CLOCK_MONOTONIC) - t)
  #     end
  #   end
  #   Flowctl::ControlPlane::Client.new(target, interceptors: [Timing.new])
  #
  # method is the RPC's path ("/flowctl.v1.ControlPlane/Register"); call a Flowctl::ClientCallInfo
  # (rpc, method_path, timeout, target). For the streaming shapes yield returns what the call
  # returns: the call object for `name_stream`, the response of a client stream. As in the
  # grpc gem, with several interceptors the last one in the list runs first (outermost).
  # Instances of GRPC::ClientInterceptor work too.
  class ClientInterceptor
    def initialize(options = {})
      @options = options || {}
    end

    def request_response(request: nil, call: nil, method: nil, metadata: nil) = yield
    def client_streamer(requests: nil, call: nil, method: nil, metadata: nil) = yield
    def server_streamer(request: nil, call: nil, method: nil, metadata: nil) = yield
    def bidi_streamer(requests: nil, call: nil, method: nil, metadata: nil) = yield
  end

  # Server interceptors, in the shape of GRPC::ServerInterceptor: they run around the handler,
  # after authentication (auth_token:). call is the Flowctl::Server::Call (headers, peer,
  # deadline, method_path, trailing_metadata=); method the handler's Method. Raise a
  # Flowctl::RPCError to end the call with that status instead of running the handler.
  #
  #   class Audit < Flowctl::ServerInterceptor
  #     def request_response(request:, call:, method:)
  #       raise Flowctl::PermissionDenied, "read only" if call.headers["x-role"] == "guest"
  #       yield
  #     end
  #   end
  #   Flowctl::Server.new(interceptors: [Audit.new])
  class ServerInterceptor
    def initialize(options = {})
      @options = options || {}
    end

    def request_response(request: nil, call: nil, method: nil) = yield
    def client_streamer(call: nil, method: nil) = yield
    def server_streamer(request: nil, call: nil, method: nil) = yield
    def bidi_streamer(requests: nil, call: nil, method: nil) = yield
  end

  # What a client interceptor learns about the call it wraps.
  ClientCallInfo = Struct.new(:rpc, :method_path, :timeout, :target, keyword_init: true)

  # Runs a call through a list of interceptors (internal).
  module Interception
    SHAPES = { unary: :request_response, client_streaming: :client_streamer,
               server_streaming: :server_streamer, bidi: :bidi_streamer }.freeze

    # The headers of an intercepted call, as the interceptors left them: the client uses them
    # as they are (they are not merged with its defaults again).
    class Metadata < Hash; end

    module_function

    # Checks a list given as interceptors: (an Array of objects with the four methods).
    def check(list, kind)
      raise TypeError, "interceptors: must be an Array (given #{list.class})" unless list.is_a?(Array)

      list.each do |i|
        missing = SHAPES.values.reject { |m| i.respond_to?(m) }
        next if missing.empty?

        raise TypeError, "interceptors: #{i.inspect} is not a #{kind} interceptor (no #{missing.join(', ')}; " \
                         "subclass Flowctl::#{kind}Interceptor)"
      end
      list.dup.freeze
    end

    # Calls the interceptors' `type` method, last one first, each yielding to the next, then
    # the block.
    def run(interceptors, type, args, index = interceptors.size - 1, &call)
      return yield if index.negative?

      interceptors[index].public_send(type, **args) { run(interceptors, type, args, index - 1, &call) }
    end
  end
end
