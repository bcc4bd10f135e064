# frozen_string_literal: true

require "spec_helper"

# Client and server interceptors (interceptors:), in the official grpc gem's shape: one method
# per call shape, keywords, yield to go on.
RSpec.describe "Flowctl interceptors" do
  Official.load! # at load time: requiring the grpc gem under GC_STRESS=1 takes many minutes
  dm = Flowctl::Processor::DataMessage

  # Records what it is called with, in a shared log, and adds a header before yielding.
  recorder = Class.new(Flowctl::ClientInterceptor) do
    def initialize(name, log)
      super()
      @name = name
      @log = log
    end

    %i[request_response client_streamer server_streamer bidi_streamer].each do |shape|
      define_method(shape) do |call: nil, method: nil, metadata: nil, **rest, &blk|
        @log << [@name, shape, method, call.method_path, rest.keys.sort]
        metadata["x-seen-by"] = [metadata["x-seen-by"], @name].compact.join(",")
        result = blk.call
        @log << [@name, :returned]
        result
      end
    end
  end

  # Server side: records the shape, the headers and the handler method; denies "x-deny" calls.
  guard = Class.new(Flowctl::ServerInterceptor) do
    def initialize(log)
      super()
      @log = log
    end

    %i[request_response client_streamer server_streamer bidi_streamer].each do |shape|
      define_method(shape) do |call: nil, method: nil, **rest, &blk|
        @log << [shape, call.headers["x-seen-by"], method.name, rest.keys.sort]
        raise Flowctl::PermissionDenied, "denied by interceptor" if call.headers["x-deny"]

        blk.call
      end
    end
  end

  before(:all) do
    @server_log = Queue.new
    @handler_calls = Queue.new
    calls = @handler_calls
    echo = Shapes::Echo.flowctl
    handler = Object.new
    %i[unary server_stream client_stream bidi].each do |name|
      handler.define_singleton_method(name) do |arg, call, &blk|
        calls << name
        echo.public_send(name, arg, call, &blk)
      end
    end
    @server = Flowctl::Server.new(port: 0, tls: false, interceptors: [guard.new(@server_log)])
    @server.handle(Shapes.service, handler)
    @server.start
  end

  after(:all) { @server&.stop(grace: 0.5) }

  let(:log) { [] }
  let(:client) do
    Shapes.client("127.0.0.1:#{@server.port}", timeout: time_limit(5), interceptors: [recorder.new("a", log), recorder.new("b", log)])
  end

  after { client.close }

  def server_log = Array.new(@server_log.size) { @server_log.pop }

  before do
    @server_log.clear
    @handler_calls.clear
  end

  it "runs around every call shape, with the grpc gem's keywords; the last interceptor runs first" do
    expect(client.unary(payload: "u").payload).to eq("u")
    expect(client.server_stream(payload: "s", metadata: { "count" => "2" }).to_a.size).to eq(2)
    expect(client.client_stream([dm.new(payload: "x"), dm.new(payload: "y")]).payload).to eq("xy")
    expect(client.bidi([dm.new(payload: "b")]).map(&:payload)).to eq(["b"])
    path = ->(m) { "/flowctl.test.Shapes/#{m}" }
    expect(log.reject { |e| e[1] == :returned }).to eq(
      [["b", :request_response, path["Unary"], path["Unary"], [:request]],
       ["a", :request_response, path["Unary"], path["Unary"], [:request]],
       ["b", :server_streamer, path["ServerStream"], path["ServerStream"], [:request]],
       ["a", :server_streamer, path["ServerStream"], path["ServerStream"], [:request]],
       ["b", :client_streamer, path["ClientStream"], path["ClientStream"], [:requests]],
       ["a", :client_streamer, path["ClientStream"], path["ClientStream"], [:requests]],
       ["b", :bidi_streamer, path["Bidi"], path["Bidi"], [:requests]],
       ["a", :bidi_streamer, path["Bidi"], path["Bidi"], [:requests]]]
    )
    expect(log.each_slice(4).map { |s| s.map(&:first) }.uniq).to eq([%w[b a a b]]) # nested: b(a(call))
    # the headers the interceptors added reached the server, whose interceptor saw each shape
    expect(server_log).to eq([[:request_response, "b,a", :unary, [:request]],
                              [:server_streamer, "b,a", :server_stream, [:request]],
                              [:client_streamer, "b,a", :client_stream, []],
                              [:bidi_streamer, "b,a", :bidi, [:requests]]])
  end

  it "returns what the call returns: the response of a unary call, the call object of name_stream" do
    seen = []
    spy = Class.new(Flowctl::ClientInterceptor) do
      define_method(:request_response) { |**, &blk| blk.call.tap { |r| seen << r } }
      define_method(:bidi_streamer) { |**, &blk| blk.call.tap { |r| seen << r.class } }
    end
    c = Shapes.client("127.0.0.1:#{@server.port}", interceptors: [spy.new])
    c.unary(payload: "r")
    c.bidi_stream { |call| call.close_write.each { nil } } # to the end: the server has logged it before the next example
    expect(seen).to eq([dm.new(payload: "r"), Flowctl::BidiCall])
  ensure
    c&.close
  end

  it "lets a server interceptor end a call with a status before the handler runs" do
    expect { client.unary(payload: "u", headers: { "x-deny" => "1" }) }
      .to raise_error(Flowctl::PermissionDenied, /denied by interceptor/)
    expect(@handler_calls.size).to eq(0)
  end

  it "lets a client interceptor remove a header and turn an error into another" do
    stripper = Class.new(Flowctl::ClientInterceptor) do
      def request_response(metadata:, **)
        metadata.delete("x-deny")
        yield
      end
    end
    c = Shapes.client("127.0.0.1:#{@server.port}", headers: { "x-deny" => "1" }, interceptors: [stripper.new])
    expect(c.unary(payload: "ok").payload).to eq("ok")
  ensure
    c&.close
  end

  it "takes the official gem's GRPC::ClientInterceptor objects" do
    official = Class.new(GRPC::ClientInterceptor) do
      def request_response(request:, call:, method:, metadata:)
        metadata["x-seen-by"] = "grpc-gem"
        yield
      end
    end
    c = Shapes.client("127.0.0.1:#{@server.port}", interceptors: [official.new])
    expect(c.unary(payload: "g").payload).to eq("g")
    expect(server_log.first[1]).to eq("grpc-gem")
  ensure
    c&.close
  end

  it "refuses what is not an interceptor" do
    expect { Shapes.client("127.0.0.1:1", interceptors: [Object.new]) }
      .to raise_error(TypeError, /is not a Client interceptor \(no request_response, client_streamer/)
    expect { Flowctl::Server.new(interceptors: :x) }.to raise_error(TypeError, /interceptors: must be an Array/)
  end
end
