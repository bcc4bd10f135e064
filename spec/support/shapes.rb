# frozen_string_literal: true

# A test service with one RPC of each of the four call shapes, on the seed's DataMessage,
# declared once for this gem (a Flowctl::Service) and once for the official grpc gem (a
# GRPC::GenericService on the google-protobuf class of the same message): interop peers
# for the call-shape specs and bench/streaming.rb.
#
#   Shapes.client("127.0.0.1:#{port}").server_stream(payload: "x", metadata: {"count" => "3"}) { |m| }
#   Shapes.official_stub(port).client_stream([msg, msg])
#   server = Shapes::OfficialServer.new(Shapes::Echo.official); port = server.start
#
# Shapes::Echo is the behaviour both kinds of server give by default (see its methods).
module Shapes
  NAME = "flowctl.test.Shapes"
  MSG = "obsrvr.flow.processor.DataMessage"

  def self.service
    @service ||= Flowctl::Service.new(NAME, [["Unary", MSG, MSG, :unary], ["ServerStream", MSG, MSG, :server_streaming],
                                             ["ClientStream", MSG, MSG, :client_streaming], ["Bidi", MSG, MSG, :bidi]])
  end

  def self.client_class = @client_class ||= Class.new(Flowctl::Client) { use_service Shapes.service }

  def self.client(target, **opts) = client_class.new(target, tls: false, **opts)

  def self.official_service
    @official_service ||= begin
      Official.load!
      m = Obsrvr::Flow::Processor::DataMessage
      Class.new do
        include GRPC::GenericService

        self.marshal_class_method = :encode
        self.unmarshal_class_method = :decode
        self.service_name = NAME
        rpc :Unary, m, m
        rpc :ServerStream, m, stream(m)
        rpc :ClientStream, stream(m), m
        rpc :Bidi, stream(m), stream(m)
      end
    end
  end

  def self.official_stub(port, **opts)
    official_service.rpc_stub_class.new("127.0.0.1:#{port}", :this_channel_is_insecure, **opts)
  end

  # A handler whose RPCs run the block the example set in state[name] (SpecHelpers#behave),
  # else the same method of default (an Echo).
  def self.scripted(state, default)
    handler = Object.new
    %i[unary server_stream client_stream bidi].each do |name|
      handler.define_singleton_method(name) do |arg, call, &blk|
        impl = state[name]
        impl ? impl.call(arg, call, &blk) : default.public_send(name, arg, call, &blk)
      end
    end
    handler
  end

  # Helpers of the call-shape specs (an example group includes them and keeps @state).
  module SpecHelpers
    def dm = Flowctl::Processor::DataMessage
    def om = Obsrvr::Flow::Processor::DataMessage
    def msg(i, payload = "p") = dm.new(payload: payload, metadata: {"i" => i.to_s})
    def behave(name, &blk) = @state[name] = blk
    def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    def pop(queue, timeout = 5) = ::OfficialServer.pop(queue, timeout)

    # The block's value; expects it to take less than seconds (time_limit scales it).
    def within(seconds)
      t0 = now
      result = yield
      expect(now - t0).to be < time_limit(seconds)
      result
    end
  end

  # The default behaviour, on either gem's message class, raising either gem's status errors:
  # - unary: echoes the request;
  # - server_stream: metadata "count" replies, each the request's payload with metadata
  #   {"i" => index}; then, when metadata "fail" is a status code, fails with it;
  # - client_stream: one response, the payloads joined, metadata {"count" => requests};
  #   a request with metadata "fail" makes it fail with that status code at once;
  # - bidi: echoes every request as it arrives.
  class Echo
    def self.flowctl = new(Flowctl::Processor::DataMessage, ->(code, msg) { raise Flowctl::RPCError.new(msg, code: code) })

    def self.official
      new(Obsrvr::Flow::Processor::DataMessage, ->(code, msg) { raise GRPC::BadStatus.new_status_exception(code, msg) })
    end

    def initialize(klass, fail_with)
      @klass = klass
      @fail = fail_with
    end

    def unary(req, _call = nil) = req

    def server_stream(req, _call = nil)
      n = Integer(req.metadata["count"] || 0)
      n.times { |i| yield @klass.new(payload: req.payload, metadata: {"i" => i.to_s}) }
      @fail.call(Integer(req.metadata["fail"]), "failed after #{n}") if req.metadata["fail"]
      nil
    end

    def client_stream(reqs, _call = nil)
      count = 0
      payload = +"".b
      reqs.each do |r|
        @fail.call(Integer(r.metadata["fail"]), "failed at request #{count}") if r.metadata["fail"]
        count += 1
        payload << r.payload
      end
      @klass.new(payload: payload, metadata: {"count" => count.to_s})
    end

    def bidi(reqs, _call = nil) = reqs.lazy.map { |r| r }
  end

  # An official grpc gem server in this process whose RPCs run a handler with Echo's
  # methods (or some of them: the others answer UNIMPLEMENTED), called as Echo's are.
  class OfficialServer
    attr_reader :port

    def initialize(handler, pool_size: 20)
      @handler = handler
      @pool_size = pool_size
    end

    def start
      h = @handler
      unimpl = ->(name) { raise GRPC::Unimplemented, "#{name} is not handled" unless h.respond_to?(name) }
      klass = Class.new(Shapes.official_service) do
        define_method(:unary) { |req, call| unimpl.call(:unary) || h.unary(req, call) }
        define_method(:server_stream) do |req, call|
          unimpl.call(:server_stream)
          Enumerator.new { |y| h.server_stream(req, call) { |m| y << m } }
        end
        define_method(:client_stream) { |call| unimpl.call(:client_stream) || h.client_stream(call.each_remote_read, call) }
        define_method(:bidi) { |reqs, call| unimpl.call(:bidi) || h.bidi(reqs, call) }
      end
      @server = GRPC::RpcServer.new(pool_size: @pool_size, poll_period: 0.2)
      @port = @server.add_http2_port("127.0.0.1:0", :this_port_is_insecure)
      @server.handle(klass.new)
      @thread = Thread.new { @server.run }
      @thread.report_on_exception = false
      @server.wait_till_running(10) or raise "official grpc server did not start"
      @port
    end

    def stop
      return unless @server

      stopper = Thread.new { @server.stop }
      stopper.join(5) or stopper.kill
      @thread.join(5) or @thread.kill
      @server = nil
    end
  end
end
