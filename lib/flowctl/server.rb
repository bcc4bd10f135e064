# frozen_string_literal: true

module Flowctl
  # A gRPC server for the flow services, on gRPC C core.
  #
  #   server = Flowctl::Server.new(port: 0, tls: false)
  #   server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
  #   server.handle(Flowctl::Processor::Service, MyProcessor.new)
  #   port = server.start
  #   ...
  #   server.stop(grace: 5)
  #
  # Handlers are plain Ruby objects with one snake_case method per RPC they serve:
  #
  #   def get_capabilities(request, call)   # unary: return the response or a Hash of its fields
  #     { name: "upcase", version: "1.0" }
  #   end
  #
  #   def process(requests, call)           # bidi: requests is an Enumerable read as it is iterated
  #     requests.each { |msg| yield msg }   # replies: yield them or call.write / call << them;
  #   end                                   # or else return an Enumerable of them
  #
  #   def stream_events(request, call)      # server streaming: one request, replies as for bidi
  #     10.times { |i| yield Event.new(id: i.to_s) }
  #   end
  #
  #   def consume(requests, call)           # client streaming: an Enumerable of requests in,
  #     { count: requests.count }           # the one response (or a Hash of its fields) out
  #   end
  #
  # Raise a Flowctl::RPCError (Flowctl::NotFound, Flowctl::RPCError.new("x", code: 9), ...) to end
  # a call with that status; any other exception ends it with UNKNOWN and its message. Either way
  # only that call fails. A handler method that takes one argument gets only the request.
  #
  # TLS: tls: false serves plaintext, a Flowctl::TLS (cert_chain:, private_key:, and root_certs: with
  # client_auth: :require for mTLS) serves TLS; tls: nil (the default) serves plaintext on a loopback
  # host only and raises ArgumentError for any other host, so nothing is exposed in clear by accident.
  #
  # auth_token: "s3cret" makes every call carry "authorization: Bearer s3cret" metadata (the scheme
  # in any case, RFC 6750; the token compared in constant time); the native acceptor answers any
  # other call with UNAUTHENTICATED itself, so it never reaches a worker or a handler.
  #
  # pool_size: worker threads serve that many calls at once. A call that arrives while every
  # worker is busy may wait max_wait seconds (default 0.1) for one to finish, if fewer than
  # max_waiting calls (default pool_size) already wait; otherwise, and when the wait runs
  # out, it ends with RESOURCE_EXHAUSTED. Nothing queues without bound. A bidi stream holds
  # its worker for as long as it is open.
  #
  # Slow and hostile peers cost their own calls, never the server: a worker never waits for
  # a status to reach the client (a status that cannot leave at once is sent by the native
  # acceptor while the worker serves the next call); a peer that takes nothing the server
  # sends for write_timeout seconds (default 30; nil: no limit) gets that call cancelled
  # (Flowctl::Cancelled in the handler's write), and its connection is shut down when a status
  # could not leave, or when it holds the most of more than 1,024 statuses waiting to leave.
  # Floods that never reach a worker (HTTP/2 rapid reset, CVE-2023-44487, is handled inside gRPC
  # core 1.51, which has no limit for it) show as memory: when the process grew by more than
  # memory_burst bytes (default 128 MB; nil: off) within two seconds, or when gRPC core held the
  # acceptor for a second without a call for it, the connection that sends the most is shut down.
  # Keepalive (KEEPALIVE_ARGS, overridable with channel_args:) pings every connection every
  # 60 s and drops one that does not answer within 20 s: dead and stuck peers go.
  class Server
    DEFAULT_POOL_SIZE = 32
    DEFAULT_WRITE_TIMEOUT = 30.0
    DEFAULT_MEMORY_BURST = 128 << 20
    KEEPALIVE_ARGS = {
      "grpc.keepalive_time_ms" => 60_000,
      "grpc.keepalive_timeout_ms" => 20_000,
      "grpc.keepalive_permit_without_calls" => 1, # idle connections are checked too
      "grpc.http2.max_pings_without_data" => 0    # ... however long they stay idle
    }.freeze
    LOOPBACK = %w[127.0.0.1 localhost ::1 [::1]].freeze

    STATS_BEFORE_START = { accepted: 0, rejected: 0, idle: 0, queued: 0, lingering: 0, stuck_closed: 0, dropped: 0,
                           idle_shed: 0, listener_stopped: false,
                           unauthenticated: 0, abusive_closed: 0, memory_closed: 0, stall_closed: 0,
                           reset_early: 0, answered_natively: 0 }.freeze

    OK = 0
    UNKNOWN = 2
    INTERNAL = 13
    UNIMPLEMENTED = 12

    attr_reader :host, :port, :pool_size

    def initialize(host: "127.0.0.1", port: 0, tls: nil, auth_token: nil, pool_size: DEFAULT_POOL_SIZE,
                   max_waiting: nil, max_wait: 0.1, write_timeout: DEFAULT_WRITE_TIMEOUT,
                   memory_burst: DEFAULT_MEMORY_BURST, channel_args: {}, interceptors: [])
      @host = String(host)
      @requested_port = Integer(port)
      @tls = check_tls(tls)
      @auth_token = check_token(auth_token)
      @pool_size = Integer(pool_size)
      raise ArgumentError, "pool_size must be at least 1 (given #{pool_size})" if @pool_size < 1

      @max_waiting = Integer(max_waiting || @pool_size)
      @max_wait = Float(max_wait)
      raise ArgumentError, "max_waiting must not be negative (given #{max_waiting})" if @max_waiting.negative?
      raise ArgumentError, "max_wait must not be negative (given #{max_wait})" if @max_wait.negative?

      @write_timeout = write_timeout.nil? ? 0.0 : Float(write_timeout)
      unless @write_timeout.positive? || write_timeout.nil?
        raise ArgumentError, "write_timeout must be positive or nil (given #{write_timeout.inspect})"
      end

      @memory_burst = memory_burst.nil? ? nil : Integer(memory_burst)
      if @memory_burst && @memory_burst < (1 << 20)
        raise ArgumentError, "memory_burst must be at least 1 MB (1048576) or nil (given #{memory_burst.inspect})"
      end

      # no SO_REUSEPORT unless asked: a second server on a taken port must fail, not share it
      @channel_args = ChannelArgs.normalize({ "grpc.so_reuseport" => 0 }.merge(KEEPALIVE_ARGS,
                                                                              ChannelArgs.normalize(channel_args)))
      @interceptors = Interception.check(interceptors, "Server")
      @routes = {}
      @state = :new
      @lock = Mutex.new
      @monitor_wake = ConditionVariable.new # stop wakes the monitor instead of waiting out its 0.25 s
      @port = nil
    end

    # call-seq: server.handle(Flowctl::ControlPlane::Service, handler) -> self
    #
    # Serves every RPC of service that handler has a method for; the service's other RPCs answer
    # UNIMPLEMENTED.
    def handle(service, handler)
      raise TypeError, "service must be a Flowctl::Service (given #{service.inspect})" unless service.is_a?(Service)
      raise "handle services before #start" unless @state == :new

      routes = service.rpcs.filter_map do |rpc|
        next unless handler.respond_to?(rpc.method_name)

        [rpc.path, Route.new(rpc, handler, handler.method(rpc.method_name).arity == 1)]
      end
      if routes.empty?
        raise ArgumentError, "#{handler.class} has no method for any RPC of #{service.full_name} " \
                             "(expected one of #{service.rpcs.map(&:method_name).join(', ')})"
      end
      @routes.merge!(routes.to_h)
      self
    end

    # call-seq: server.start -> Integer (the bound port)
    def start
      @lock.synchronize do
        raise "server already started" unless @state == :new
        raise ArgumentError, "no handlers: call #handle first" if @routes.empty?

        Server.raise_nofile_limit
        @native, @port = listen(address)
        @routes.freeze
        @unary_routes = @routes.values.select { |r| r.rpc.shape == :unary }.freeze
        @pid = Process.pid
        @workers = start_native(@native)
        @retired = []
        @state = :running
        @monitor = spawn_monitor
      end
      @port
    end

    # The soft limit of open descriptors up to the hard one (gRPC core 1.51 stops accepting for
    # good when it runs out of them); false when it could not.
    def self.raise_nofile_limit
      soft, hard = Process.getrlimit(:NOFILE)
      return true if soft == hard

      Process.setrlimit(:NOFILE, hard, hard)
      true
    rescue SystemCallError, NotImplementedError
      false
    end

    def running? = @state == :running && !forked?

    # call-seq: server.stop(grace: 5) -> nil
    #
    # Stops accepting calls, lets calls in flight finish for up to grace seconds, then cancels
    # the rest (handlers that ignore the cancellation are killed a second later). Idempotent.
    def stop(grace: 5)
      @lock.synchronize do
        return nil unless @state == :running

        @state = forked? ? :stopped : :stopping
        @monitor_wake.broadcast
      end
      return nil if forked? # the parent's server: nothing of it runs in this process
      @monitor.join unless @monitor.equal?(Thread.current)
      stop_native(@native, @workers, grace)
      @retired.each(&:join) # servers replaced after their listener stopped (restart_listener)
      @state = :stopped
      nil
    end

    # {accepted:, rejected:, idle:, queued:, lingering:, unauthenticated:, stuck_closed:, abusive_closed:,
    # memory_closed:, stall_closed:, reset_early:} as counted by the native acceptor: lingering, statuses still on their way;
    # unauthenticated, calls refused for their token; reset_early, calls the peer cancelled before a
    # worker got them (HTTP/2 rapid reset); *_closed, connections shut down because
    # their peer did not read (stuck), had more than 200 calls refused or reset in a second (abusive), or
    # sent the most while memory grew by memory_burst (memory) or gRPC held the acceptor (stall);
    # dropped, calls that came out of gRPC core from a connection already shut; idle_shed,
    # connections shut near the descriptor limit; listener_stopped, see restart_listener;
    # answered_natively, unary calls a handler's native answer took on the acceptor thread
    # (Registry#native_unary: flowctl.v1 heartbeats), never seen by a worker (counted in accepted).
    def stats
      @native ? @native.stats : STATS_BEFORE_START
    end

    def inspect
      "#<Flowctl::Server #{address_for_display} #{@state} tls: #{@tls ? true : false} " \
        "rpcs: #{@routes.size} pool_size: #{@pool_size}>"
    end

    # The call object handlers get next to the request.
    class Call
      attr_reader :rpc

      def initialize(native, rpc)
        @native = native
        @rpc = rpc
        @trailing_metadata = nil # made when first asked for: most calls send none
        @replied = false
      end

      # True once a reply was yielded or written on this call.
      def replied? = @replied

      # Trailing metadata sent with the status (a Hash the handler may fill in).
      def trailing_metadata = @trailing_metadata ||= {}

      # The trailing metadata, nil when the handler never asked for it (the server's finish).
      def trailing_or_nil = @trailing_metadata

      # Request metadata (Hash; "-bin" values binary).
      def headers = @headers ||= @native.headers
      alias metadata headers

      # "ipv4:127.0.0.1:54321"
      def peer = @native.peer

      # "/obsrvr.flow.processor.ProcessorService/Process"
      def method_path = @native.method_path

      # The client's deadline as a Time, or nil when it set none.
      def deadline
        d = @native.deadline
        d && Time.at(d)
      end

      # True once the client cancelled or went away.
      def cancelled? = @native.cancelled?

      # Trailing metadata sent with the status (merged with an RPCError's #metadata).
      def trailing_metadata=(hash)
        @trailing_metadata = Native.validate_headers(hash).dup
      end

      # Sends one reply on a server streaming or bidi call (a message object or a Hash of its
      # fields). Thread-safe.
      def write(reply)
        raise ArgumentError, "#{@rpc.name} is #{@rpc.shape}: return the response instead" unless @rpc.server_streaming?

        msg = Server.reply_message(@rpc, reply) # encoded by send_message, straight into gRPC's memory
        (@write_lock ||= Mutex.new).synchronize do
          @native.send_message(msg)
          @replied = true
        end
        self
      end

      def <<(reply) = write(reply)

      def inspect = "#<Flowctl::Server::Call #{method_path} peer: #{peer}>"
    end

    # The requests of a client streaming or bidi call: read from the wire as it is iterated, once.
    class Requests
      include Enumerable

      def initialize(native, klass)
        @native = native
        @klass = klass
        @done = false
      end

      def each
        return enum_for(:each) unless block_given?

        while (msg = read)
          yield msg
        end
        self
      end

      # Ends the call (CANCELLED) from any thread: a #read waiting on it raises
      # Flowctl::Cancelled. Idempotent.
      def cancel = @native.cancel

      # The next request, or nil once the client has closed its side.
      def read
        return nil if @done

        msg = @native.recv(true, @klass) # decoded straight from gRPC's memory
        @done = true if msg.nil?
        msg
      rescue DecodeError => e
        raise InvalidRequest, "cannot decode #{@klass.descriptor_name}: #{e.message}"
      end
    end

    # Raised into a handler when the request bytes are not a valid message.
    class InvalidRequest < Flowctl::Error; end
    # A handler returned something that is not its RPC's response.
    class BadReply < Flowctl::Error; end

    Route = Struct.new(:rpc, :handler, :request_only)

    def self.encode_reply(rpc, reply) = reply_message(rpc, reply).to_proto

    # The reply as a message of rpc's response class (a Hash is built into one).
    def self.reply_message(rpc, reply)
      klass = rpc.response_class
      case reply
      when klass then reply
      when Hash then klass.new(**reply.transform_keys(&:to_sym))
      else
        raise BadReply, "#{rpc.name} must reply with a #{klass} or a Hash of its fields (got #{reply.class})"
      end
    rescue ArgumentError, TypeError, RangeError => e
      raise BadReply, "#{rpc.name} reply: #{e.message}"
    end

    private

    def check_tls(tls)
      case tls
      when false, TLS
        if tls && tls.cert_chain.nil?
          raise ArgumentError, "a TLS server needs cert_chain: and private_key: in its Flowctl::TLS"
        end
        tls
      when nil
        unless LOOPBACK.include?(@host)
          raise ArgumentError, "plaintext on #{@host} must be asked for: pass tls: false, or a Flowctl::TLS"
        end
        false
      else
        raise TypeError, "tls: must be false or a Flowctl::TLS (given #{tls.class})"
      end
    end

    def check_token(token)
      return nil if token.nil?
      raise TypeError, "auth_token must be a String (given #{token.class})" unless token.is_a?(String)
      raise ArgumentError, "auth_token must not be empty" if token.empty?
      raise ArgumentError, "auth_token must not contain spaces or control characters" if token.match?(/[\x00-\x20\x7f]/n)

      token.b.freeze
    end

    def address
      h = @host.include?(":") && !@host.start_with?("[") ? "[#{@host}]" : @host
      "#{h}:#{@requested_port}"
    end

    def address_for_display = @port ? address.sub(/:\d+\z/, ":#{@port}") : address

    # A native server listening on addr: [native, bound port].
    def listen(addr)
      native = Native::Server.new(@channel_args)
      [native, native.add_port(addr, @tls ? @tls.to_native << @tls.client_auth : false)]
    rescue StandardError
      native&.close
      raise
    end

    # Starts native with a fresh pool of workers; returns them.
    def start_native(native)
      @unary_routes.each do |route|
        native.register_unary(route.rpc.path) # served as unary_index
        answer = native_answer(route)
        native.answer_natively(route.rpc.path, answer) if answer
      end

      workers = Array.new(@pool_size) { |i| spawn_worker(i, native) } # they wait for calls before any arrive
      native.start(@max_waiting, @max_wait, @write_timeout, @auth_token, @memory_burst)
      workers
    rescue StandardError
      native.close # never started: ends the workers' wait
      workers&.each(&:join)
      raise
    end

    # A handler's native answer for a unary RPC (Registry#native_unary), only without
    # interceptors (they would not see those calls).
    def native_answer(route)
      return nil unless @interceptors.empty? && route.handler.respond_to?(:native_unary)

      route.handler.native_unary(route.rpc)
    end

    def stop_native(native, workers, grace)
      native.shutdown
      done = native.wait_shutdown(Float(grace)) || force_stop(native, workers)
      workers.each { |t| t.join unless t.equal?(Thread.current) }
      if done
        native.close
      else
        warn "flowctl server: calls still hold the server after stop; leaving it to the garbage collector"
      end
    end

    # Watches the native server for a listener gRPC core gave up on (see ext/flowctl/server_engine.c, 2d).
    def spawn_monitor
      Thread.new do
        Thread.current.name = "flowctl-server-monitor"
        Thread.current.report_on_exception = false
        loop do
          @lock.synchronize { @monitor_wake.wait(@lock, 0.25) if @state == :running }
          break unless @state == :running

          restart_listener if @native.stats[:listener_stopped]
        end
      end
    end

    # gRPC core 1.51 stops accepting for good after accept4 fails (EMFILE): the current native
    # server stops taking connections (those it has go on to the end of their calls, then it is
    # closed), and a new one listens on the same port, tried every 0.1 s while descriptors are
    # short.
    def restart_listener
      warn "flowctl server: gRPC core stopped accepting connections on port #{@port} (accept4 failed: " \
           "out of file descriptors?); starting a new listener on it"
      old, old_workers = @native, @workers
      old.shutdown
      old.release_listeners
      addr = address.sub(/:\d+\z/, ":#{@port}")
      native = nil
      while native.nil? && @state == :running
        native = begin
          listen(addr).first
        rescue ArgumentError, SystemCallError
          sleep 0.1
          nil
        end
      end
      return native&.close unless @state == :running

      workers = start_native(native)
      @lock.synchronize { @native, @workers = native, workers }
      warn "flowctl server: listening again on port #{@port}"
      @retired << Thread.new { stop_native(old, old_workers, 30) }
    end

    def spawn_worker(index, native)
      Thread.new do
        Thread.current.name = "flowctl-server-#{index}"
        while (ncall = native.next_call)
          begin
            serve(ncall)
          rescue Exception => e # rubocop:disable Lint/RescueException -- a worker outlives any call
            warn "flowctl server: #{e.class}: #{e.message}" unless e.is_a?(Flowctl::Error)
          end
        end
      end
    end

    # After the grace period: cancel every call, give handlers a second to notice, then kill
    # the workers still busy (their ensure releases the calls). True once the server is done.
    def force_stop(native, workers)
      native.cancel_all
      others = workers.reject { |t| t.equal?(Thread.current) }
      limit = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 1.0
      others.each { |t| t.join([limit - Process.clock_gettime(Process::CLOCK_MONOTONIC), 0].max) }
      others.each { |t| t.kill if t.alive? }
      others.each(&:join)
      native.wait_shutdown(10)
    end

    # In a child forked while this server ran: the server, its threads and its calls are the parent's.
    def forked? = @pid && @pid != Process.pid

    # One call, start to end. The ensure releases the native call whatever happened. A call of
    # a unary method comes with its index in @unary_routes (Native::Server#register_unary).
    def serve(ncall)
      index = ncall.unary_index
      route = index ? @unary_routes[index] : @routes[ncall.method_path]
      if route.nil?
        ncall.finish(UNIMPLEMENTED, "unknown method #{ncall.method_path}", nil)
      else
        run(ncall, route)
      end
    rescue Flowctl::Error
      nil # the client went away while we answered; nothing left to tell it
    ensure
      ncall.cancel
    end

    def run(ncall, route)
      call = Call.new(ncall, route.rpc)
      reply = nil
      begin
        case route.rpc.shape
        when :unary then reply = run_unary(ncall, route, call)
        when :client_streaming then reply = run_client_streaming(ncall, route, call)
        when :server_streaming then run_server_streaming(ncall, route, call)
        else run_bidi(ncall, route, call)
        end
      rescue Cancelled
        raise if ncall.finished? || ncall.cancelled?

        return finish(ncall, call, Cancelled::CODE, $!.details, nil, $!.metadata)
      rescue RPCError => e
        return finish(ncall, call, e.code, e.details, nil, e.metadata)
      rescue InvalidRequest, BadReply => e
        return finish(ncall, call, INTERNAL, e.message)
      rescue StandardError, ScriptError => e
        return finish(ncall, call, UNKNOWN, "#{e.class}: #{e.message}")
      end
      finish(ncall, call, OK, nil, reply)
    end

    def finish(ncall, call, code, details, bytes = nil, metadata = nil)
      mine = call.trailing_or_nil
      trailing = metadata.nil? || metadata.empty? || mine.nil? ? mine || metadata : mine.merge(metadata)
      ncall.finish(code, details, trailing, bytes)
    rescue ArgumentError, TypeError => e # bad trailing metadata from the handler
      ncall.finish(INTERNAL, "bad trailing metadata: #{e.message}", nil)
    end

    def run_unary(ncall, route, call)
      request = read_request(ncall, route.rpc)
      reply = if @interceptors.empty? then invoke(route, request, call) # no Hash, no block made per call
              else intercepted(route, call, request: request) { invoke(route, request, call) }
              end
      Server.encode_reply(route.rpc, reply)
    end

    # Runs the block through the server's interceptors (last one first, as the grpc gem).
    def intercepted(route, call, **args, &block)
      return yield if @interceptors.empty?

      method = route.handler.method(route.rpc.method_name)
      Interception.run(@interceptors, Interception::SHAPES.fetch(route.rpc.shape), { call: call, method: method, **args },
                       &block)
    end

    # The one request of a unary or server streaming call.
    def read_request(ncall, rpc)
      request = ncall.recv(false, rpc.request_class) # decoded straight from gRPC's memory
      raise InvalidRequest, "#{rpc.name}: the client sent no request message" if request.nil?

      request
    rescue DecodeError => e
      raise InvalidRequest, "cannot decode #{rpc.request_class.descriptor_name}: #{e.message}"
    end

    def run_server_streaming(ncall, route, call)
      request = read_request(ncall, route.rpc)
      intercepted(route, call, request: request) do
        result = invoke(route, request, call) { |reply| call.write(reply) }
        write_all(call, result) unless result.equal?(request)
      end
    end

    def run_client_streaming(ncall, route, call)
      reply = intercepted(route, call) { invoke(route, Requests.new(ncall, route.rpc.request_class), call) }
      Server.encode_reply(route.rpc, reply)
    end

    def run_bidi(ncall, route, call)
      requests = Requests.new(ncall, route.rpc.request_class)
      intercepted(route, call, requests: requests) do
        result = invoke(route, requests, call) { |reply| call.write(reply) }
        write_all(call, result) unless result.equal?(requests)
      end
    end

    # Calls the handler's method with the request(s), and the call unless it takes one argument.
    def invoke(route, input, call, &block)
      name = route.rpc.method_name
      route.request_only ? route.handler.public_send(name, input, &block) : route.handler.public_send(name, input, call, &block)
    end

    # A streaming handler that neither yielded nor wrote a reply may return an Enumerable of
    # them (not a message or a Hash). Once it has sent one, what it returns is the last value
    # of its loop (`rows.each { |r| yield event(r) }` returns rows), never more replies.
    def write_all(call, result)
      return if call.replied? || !result.is_a?(Enumerable)
      return if result.is_a?(Hash) || result.is_a?(Struct)

      result.each { |reply| call.write(reply) }
    end
  end
end
