# frozen_string_literal: true

module Flowctl
  # What every flow client shares: the channel, defaults, and the one method per RPC
  # that Client.use_service generates from a Flowctl::Service (no hand-written method
  # per RPC). Subclasses: Flowctl::ControlPlane::Client, Flowctl::Processor::Client.
  #
  #   client = Flowctl::ControlPlane::Client.new("127.0.0.1:8080", tls: false)
  #   client.register_processor(processor_id: "p1", endpoint: "127.0.0.1:9000", metadata: {"zone" => "a"})
  #   client.processor_heartbeat(req, timeout: 1.0, headers: {"authorization" => "Bearer x"})
  #
  # The C layer (Flowctl::Native::Call, Flowctl::Native::Stream) moves bytes; this file
  # builds and decodes messages and owns the policy: defaults, keyword arguments, merging
  # of headers, and the writer thread of a bidi call.
  class Client
    # Per-call option not given: use the client's default.
    UNSET = Object.new.freeze
    private_constant :UNSET

    # The result of #invoke: the response and the metadata the server sent with it.
    Reply = Struct.new(:response, :initial_metadata, :trailing_metadata)

    attr_reader :target, :timeout, :headers, :channel

    class << self
      attr_reader :service

      # Generates one method per RPC of service, by its shape:
      # - unary `name(request or fields)` returns the response;
      # - server streaming `name(request or fields) { |reply| }` yields the replies (an
      #   Enumerator without a block), `name_stream(request or fields)` gives the call;
      # - client streaming `name(requests)` sends an Enumerable of requests and returns the
      #   response, `name_stream` gives the call (write, close_write, response);
      # - bidi `name(requests) { |reply| }` writes and yields at once (an Enumerator without
      #   a block), `name_stream` gives the call.
      def use_service(service)
        @service = service
        service.rpcs.each do |rpc|
          check_option_names(rpc)
          send(:"define_#{rpc.shape}", rpc)
        end
      end

      # Seconds (Numeric >= 0) or nil (no deadline), checked once.
      def check_timeout(value)
        return nil if value.nil?
        raise TypeError, "timeout must be a number of seconds or nil (given #{value.class})" unless value.is_a?(Numeric)
        raise ArgumentError, "timeout must be >= 0 seconds (given #{value})" if value.negative? || value.to_f.nan?

        value
      end

      private

      # timeout: and headers: are the per-call options; a message field of either name
      # could not be passed as a keyword, so refuse such a service up front. So is an RPC
      # whose method would replace one a client needs (close, inspect, hash, ...).
      def check_option_names(rpc)
        clash = rpc.request_class.fields.map(&:to_sym) & %i[timeout headers]
        raise ArgumentError, "#{rpc.request_class} has field(s) #{clash.inspect}, which clash with call options" if clash.any?

        names = [rpc.method_name, :"#{rpc.method_name}_stream"]
        taken = names.find { |n| Client.method_defined?(n) || Client.private_method_defined?(n, false) }
        raise ArgumentError, "#{rpc.path}: a client method #{taken} exists already: the RPC would replace it" if taken
      end

      def define_unary(rpc)
        define_method(rpc.method_name) do |request = nil, timeout: UNSET, headers: nil, **fields|
          call_unary(rpc, request, fields, timeout, headers).first
        end
      end

      def define_server_streaming(rpc)
        define_method(rpc.method_name) do |request = nil, timeout: UNSET, headers: nil, **fields, &block|
          call_server_streaming(rpc, request, fields, timeout, headers, &block)
        end
        define_method(:"#{rpc.method_name}_stream") do |request = nil, timeout: UNSET, headers: nil, **fields, &block|
          req = build_request(rpc, request, fields)
          call = intercepted(rpc, headers, timeout, request: req) do |md|
            ServerStreamCall.new(rpc, new_stream(rpc, timeout, md, req.to_proto))
          end
          open_call(call, &block)
        end
      end

      def define_client_streaming(rpc)
        define_method(rpc.method_name) do |requests, timeout: UNSET, headers: nil|
          check_requests(rpc, requests)
          intercepted(rpc, headers, timeout, requests: requests) do |md|
            ClientStreamCall.new(rpc, new_stream(rpc, timeout, md)).run(requests)
          end
        end
        define_method(:"#{rpc.method_name}_stream") do |timeout: UNSET, headers: nil, &block|
          call = intercepted(rpc, headers, timeout, requests: nil) do |md|
            ClientStreamCall.new(rpc, new_stream(rpc, timeout, md))
          end
          open_call(call, &block)
        end
      end

      def define_bidi(rpc)
        define_method(rpc.method_name) do |requests, timeout: UNSET, headers: nil, &block|
          call_bidi(rpc, requests, timeout, headers, &block)
        end
        define_method(:"#{rpc.method_name}_stream") do |timeout: UNSET, headers: nil, &block|
          call = intercepted(rpc, headers, timeout, requests: nil) do |md|
            BidiCall.new(rpc, new_stream(rpc, timeout, md))
          end
          open_call(call, &block)
        end
      end
    end

    # target: "host:port", or any gRPC target ("ipv4:127.0.0.1:1,127.0.0.1:2" with
    # channel_args: {"grpc.lb_policy_name" => "round_robin"}).
    # timeout: default deadline of unary calls in seconds (nil: none). Streams have no
    # deadline unless the call gives one: a Process stream may rightly last for hours.
    # tls: nil or true (TLS with the system roots), a Flowctl::TLS (own roots, mTLS), or
    # false (plaintext, only when asked for).
    # headers: gRPC metadata sent with every call ("-bin" keys carry binary values).
    # interceptors: Flowctl::ClientInterceptor objects around every call (see interceptors.rb).
    def initialize(target, timeout: 5.0, tls: nil, headers: {}, channel_args: {}, interceptors: [])
      raise TypeError, "target must be a String (given #{target.class})" unless target.is_a?(String)
      raise ArgumentError, "target must not be empty" if target.empty?

      @target = target.dup.freeze
      @timeout = self.class.check_timeout(timeout)
      @headers = normalize_headers(headers).freeze
      @interceptors = Interception.check(interceptors, "Client")
      @channel = Native::Channel.new(@target, native_tls(tls), ChannelArgs.normalize(channel_args))
    end

    # Calls a unary RPC by method name and returns a Reply with the response and the
    # server's initial and trailing metadata.
    def invoke(method_name, request = nil, timeout: UNSET, headers: nil, **fields)
      rpc = self.class.service.rpc(method_name.to_sym)
      raise ArgumentError, "#{self.class} has no unary RPC #{method_name.inspect}" unless rpc&.unary?

      Reply.new(*call_unary(rpc, request, fields, timeout, headers))
    end

    # Closes the channel; calls in flight fail, later calls raise IOError. Idempotent.
    def close
      @channel.close
      nil
    end

    def closed? = @channel.closed?

    def inspect
      "#<#{self.class} #{target}#{closed? ? ' (closed)' : ''}>"
    end

    private

    def call_unary(rpc, request, fields, timeout, headers)
      req = build_request(rpc, request, fields)
      timeout = call_timeout(timeout)
      initial = trailing = nil
      response = intercepted(rpc, headers, timeout, request: req) do |md|
        args = [@channel, rpc.path, req.to_proto, timeout, md]
        # under a Fiber scheduler the call yields to it instead of blocking the thread
        body, initial, trailing = FiberCalls.scheduled? ? FiberCalls.unary(*args) : Native::Call.unary(*args)
        rpc.response_class.decode(body)
      end
      [response, initial, trailing]
    end

    # Runs the block (given the call's headers) through the client's interceptors.
    def intercepted(rpc, headers, timeout, **args)
      return yield(call_headers(headers)) if @interceptors.empty?

      md = Interception::Metadata.new.update(call_headers(headers))
      timeout = nil if timeout.equal?(UNSET) # a stream without a deadline
      info = ClientCallInfo.new(rpc: rpc, method_path: rpc.path, timeout: timeout, target: @target)
      Interception.run(@interceptors, Interception::SHAPES.fetch(rpc.shape),
                       { call: info, method: rpc.path, metadata: md, **args }) do
        yield Interception::Metadata.new.update(normalize_headers(md))
      end
    end

    def call_bidi(rpc, requests, timeout, headers, &block)
      check_requests(rpc, requests)
      # checked now, not when the Enumerator runs
      timeout = stream_timeout(timeout)
      headers = call_headers(headers)
      unless block
        enum = enum_for(:call_bidi, rpc, requests, timeout, headers)
        return enum unless @interceptors.empty?

        return Forwarding.mark(enum, Forwarding::Source.new(@channel, rpc, nil, requests, timeout, headers))
      end

      intercepted(rpc, headers, timeout, requests: requests) do |md|
        BidiCall.new(rpc, Native::Stream.new(@channel, rpc.path, timeout, md)).run(requests, &block)
      end
    end

    # The request is built and checked now, the call starts when replies are asked for.
    def call_server_streaming(rpc, request, fields, timeout, headers, &block)
      req = build_request(rpc, request, fields)
      bytes = req.to_proto
      timeout = stream_timeout(timeout)
      headers = call_headers(headers)
      unless block
        enum = enum_for(:server_streaming_bytes, rpc, bytes, timeout, headers, req)
        return enum unless @interceptors.empty?

        return Forwarding.mark(enum, Forwarding::Source.new(@channel, rpc, bytes, nil, timeout, headers))
      end

      server_streaming_bytes(rpc, bytes, timeout, headers, req, &block)
    end

    def server_streaming_bytes(rpc, bytes, timeout, headers, request = nil, &block)
      intercepted(rpc, headers, timeout, request: request) do |md|
        call = ServerStreamCall.new(rpc, Native::Stream.new(@channel, rpc.path, timeout, md, bytes))
        begin
          call.each(&block)
        ensure
          call.cancel unless call.finished? # the block left early
        end
      end
    end

    def check_requests(rpc, requests)
      return if requests.respond_to?(:each)

      raise TypeError, "#{rpc.method_name} takes an Enumerable of requests (given #{requests.class})"
    end

    # A streaming call: no deadline unless the call gives one (a stream may rightly last hours).
    def stream_timeout(timeout) = timeout.equal?(UNSET) ? nil : self.class.check_timeout(timeout)

    def new_stream(rpc, timeout, headers, request = nil)
      Native::Stream.new(@channel, rpc.path, stream_timeout(timeout), call_headers(headers), request)
    end

    # A call object, or with a block: yields it and cancels it if the block leaves it unfinished.
    def open_call(call)
      return call unless block_given?

      begin
        yield call
      ensure
        call.cancel unless call.finished?
      end
    end

    def build_request(rpc, request, fields)
      klass = rpc.request_class
      if request.nil?
        klass.new(**fields) # an unknown keyword: ArgumentError naming it and the fields
      elsif !fields.empty?
        check_keywords(rpc, klass, fields)
        raise ArgumentError, "#{rpc.method_name}: give a request or its fields as keywords, not both"
      elsif request.is_a?(klass)
        request
      elsif request.is_a?(Hash)
        klass.new(**request.transform_keys(&:to_sym))
      else
        raise TypeError, "#{rpc.method_name} takes a #{klass} or its fields as keywords (given #{request.class})"
      end
    end

    # A keyword that is neither a per-call option nor a field of the request (wait_for_ready:,
    # metadata: of another request, a typo) is named as such.
    def check_keywords(rpc, klass, fields)
      unknown = fields.keys - klass.fields.map(&:to_sym)
      return if unknown.empty?

      raise ArgumentError, "#{rpc.method_name}: unknown keyword(s) #{unknown.map(&:inspect).join(', ')}: " \
                           "the per-call options are timeout: and headers:, the fields of #{klass} " \
                           "#{klass.fields.map(&:to_sym).inspect}"
    end

    def call_timeout(timeout)
      timeout.equal?(UNSET) ? @timeout : self.class.check_timeout(timeout)
    end

    def call_headers(headers)
      return headers if headers.instance_of?(Interception::Metadata) # final: what the interceptors left
      return @headers if headers.nil? || (headers.is_a?(Hash) && headers.empty?)

      @headers.empty? ? normalize_headers(headers) : @headers.merge(normalize_headers(headers))
    end

    # String keys, so that per-call headers override the client's whatever the key type;
    # validated here so a bad header fails with its name before any call.
    def normalize_headers(headers)
      raise TypeError, "headers: must be a Hash (given #{headers.class})" unless headers.is_a?(Hash)

      Native.validate_headers(headers.transform_keys { |k| k.is_a?(Symbol) ? k.to_s : k })
    end

    def native_tls(tls)
      case tls
      when false then false
      when nil, true then [nil, nil, nil]
      when TLS then tls.to_native
      else raise TypeError, "tls: must be nil (system roots), a Flowctl::TLS or false (plaintext) (given #{tls.class})"
      end
    end
  end

  # What the streaming calls of a client share: the call's status, metadata, and cancel.
  # Subclasses: ServerStreamCall (reads), ClientStreamCall (writes, then one response),
  # BidiCall (both). Errors from the server come as Flowctl::RPCError.
  class StreamCall
    attr_reader :rpc

    def initialize(rpc, stream)
      @rpc = rpc
      @stream = stream
    end

    # Cancels the call without blocking: a blocked #read or #write returns.
    def cancel
      @stream.cancel
      nil
    end

    def initial_metadata = @stream.initial_metadata
    def trailing_metadata = @stream.trailing_metadata
    # The gRPC status code once the call has ended (nil before).
    def status = @stream.status
    def details = @stream.details
    def finished? = @stream.finished?
    # The Flowctl::RPCError the call ended with, if any.
    def error = @stream.error

    def inspect
      "#<#{self.class} #{@rpc.path} #{finished? ? "status: #{status}" : 'open'}>"
    end

    private

    # The next reply, decoded (from gRPC's memory), or nil at the end (raising the call's error, if any).
    def read_reply
      klass = @rpc.response_class
      FiberCalls.blocking(@stream) { @stream.read(klass) } # under a Fiber scheduler: off this thread
    rescue DecodeError
      cancel
      raise
    end

    # The request as a message of the RPC's request class (a Hash is built into one); the
    # stream encodes it straight into gRPC's memory.
    def request_message(request)
      klass = @rpc.request_class
      request = klass.new(**request.transform_keys(&:to_sym)) if request.is_a?(Hash)
      raise TypeError, "#{@rpc.name} writes #{klass} (given #{request.class})" unless request.is_a?(klass)

      request
    end

    # The Native::Stream (Forwarding::Source forwards from it).
    def native_stream = @stream

    # Writes every request of an Enumerable. True when all went out; false when the call
    # ended first (its status tells why). Whatever the Enumerable (or a bad request in it)
    # raises cancels the call and is raised. The replies of another call (Forwarding) go
    # through as bytes.
    def write_all(requests)
      source = Forwarding.source_for(requests, @rpc.request_class)
      return forward_from(source) if source

      requests.each do |r|
        msg = request_message(r)
        begin
          @stream.write(msg)
        rescue IOError, RPCError
          return false # the call is over: the reader gets its status
        end
      end
      true
    rescue Exception # rubocop:disable Lint/RescueException -- an interrupt cancels as well
      cancel
      raise
    end

    # write_all for the replies of a Forwarding::Source: true once the source ended with OK,
    # false when this call ended first (the source is cancelled). The source's error, or
    # the DecodeError of a message that is not a request, cancels this call and is raised.
    def forward_from(source)
      source.open do |stream, call|
        next true if stream.forward(@stream, @rpc.request_class)

        call.cancel # this call ended: the source's replies are not wanted any more
        false
      end
    rescue Exception # rubocop:disable Lint/RescueException -- an interrupt cancels as well
      cancel
      raise
    end
  end

  # Reading the replies of a server streaming or bidi call.
  module ReadingCall
    include Enumerable

    # The next reply, or nil at the end of the stream; raises the call's RPCError when
    # it ended with another status than OK.
    def read = read_reply

    # Yields every reply until the end of the stream.
    def each
      return enum_for(:each) unless block_given?

      while (reply = read)
        yield reply
      end
      self
    end
  end

  # Writing the requests of a client streaming or bidi call.
  module WritingCall
    # Sends one request (a request object or a Hash of its fields).
    def write(request)
      @stream.write(request_message(request))
      self
    end
    alias_method :<<, :write

    # Tells the server that no more requests follow. Idempotent.
    def close_write
      FiberCalls.blocking(@stream) { @stream.close_write }
      self
    end
  end

  # A server streaming call: its request went with the call; read the replies.
  #
  #   call = client.stream_events_stream(request)
  #   call.each { |event| p event }
  #   call.trailing_metadata
  class ServerStreamCall < StreamCall
    include ReadingCall
  end

  # A client streaming call: write requests, then take the one response.
  #
  #   call = client.consume_stream
  #   call << event1 << event2
  #   call.response            # half-closes, waits for the response and the status
  class ClientStreamCall < StreamCall
    include WritingCall

    # Half-closes (when not done yet), then the server's one response; raises the call's
    # RPCError when it ended with another status than OK. The same response every time.
    def response
      return @response if defined?(@response)

      close_write
      reply = read_reply
      if reply.nil?
        raise Internal.new("the server sent no response message", metadata: trailing_metadata || {})
      end
      unless FiberCalls.blocking(@stream) { @stream.read }.nil? # the end, and the status
        cancel
        raise Internal, "the server sent more than one response message to #{@rpc.name}"
      end
      @response = reply
    end
    alias read response

    # Writes every request and returns the response (the block form of a client's client
    # streaming method). A server that ends the call early stops the writing: its status
    # is raised (or its response returned).
    def run(requests)
      write_all(requests)
      response
    end
  end

  # A bidi call: write requests and read replies, from one thread or two (one writer,
  # one reader). Errors from the server come from #read / #each as Flowctl::RPCError.
  #
  #   call = client.process_stream
  #   call << Flowctl::Processor::DataMessage.new(payload: "x")
  #   call.close_write
  #   call.each { |reply| p reply }
  #   call.trailing_metadata
  class BidiCall < StreamCall
    include ReadingCall
    include WritingCall

    # Writes requests from a writer thread while replies are yielded here; used by the
    # block form of a client's bidi method. Returns self (finished: status, metadata);
    # raises the call's error, or the error of the requests Enumerable (which cancels
    # the call).
    def run(requests, &block)
      with_writer(requests) { each(&block) }
      self
    end

    private

    # Runs the block (which reads) while a writer thread writes the requests, and returns its
    # value; raises the errors of both as #run raises them. Forwarding::Source reads through
    # Native::Stream#forward.
    def with_writer(requests)
      writer = start_writer(requests)
      begin
        result = yield
      rescue RPCError => e
        # the writer cancels the call when the Enumerable raises: its error comes first
        done = writer.join(e.is_a?(Cancelled) ? 1 : 0)
        raise((done && writer.value) || e)
      end
      failure = writer.alive? ? nil : writer.value
      raise failure if failure

      result
    ensure
      stop_writer(writer)
    end

    # The writer thread returns nil, or the exception of the requests Enumerable (which
    # cancels the call). A write failing because the call ended is not its error: the
    # reader gets the status.
    def start_writer(requests)
      writer = Thread.new do
        Thread.current.report_on_exception = false
        close_write_quietly if write_all(requests)
        nil
      rescue Exception => e # rubocop:disable Lint/RescueException -- handed to the caller
        e
      end
      writer.name = "flowctl-writer"
      writer
    end

    def close_write_quietly
      close_write
    rescue IOError, RPCError
      nil
    end

    # The reader is done (or left early): a writer still busy has nothing left to do.
    def stop_writer(writer)
      return unless writer&.alive?

      cancel
      writer.kill
      writer.join
    end
  end

  module ControlPlane
    # Client of the control plane: register_processor, processor_heartbeat,
    # register_source, source_heartbeat, register_consumer, consumer_heartbeat.
    class Client < Flowctl::Client
      use_service ControlPlane::Service
    end
  end

  module Processor
    # Client of a processor: get_capabilities, process(requests) { |reply| } and
    # process_stream -> Flowctl::BidiCall.
    class Client < Flowctl::Client
      use_service Processor::Service
    end
  end
end
