# frozen_string_literal: true

require "spec_helper"
require "timeout"

# Flowctl::Server driven by this gem's own clients: the embedded control plane end to end,
# streams in both directions, statuses, deadlines, cancellation, TLS and tokens.
RSpec.describe "Flowctl::Server with Flowctl clients" do
  fixtures = File.expand_path("fixtures/tls", __dir__)
  define_method(:pem) { |name| File.read(File.join(fixtures, name)) }

  let(:servers) { [] }
  let(:clients) { [] }

  after do
    clients.each(&:close)
    servers.each { |s| s.stop(grace: 0.5) }
  end

  def start(handlers, opts = {})
    server = Flowctl::Server.new(port: 0, **{ tls: false }.merge(opts))
    handlers.each { |service, handler| server.handle(service, handler) }
    servers << server
    server.start
    server
  end

  def client(klass, server, **opts)
    c = klass.new("127.0.0.1:#{server.port}", **{ tls: false }.merge(opts))
    clients << c
    c
  end

  def msg(payload, meta = {}) = Flowctl::Processor::DataMessage.new(payload: payload, metadata: meta)

  class Doubler
    def process(requests, call)
      requests.each { |m| yield({ payload: m.payload * 2, metadata: m.metadata.merge("peer" => call.peer) }) }
    end

    def get_capabilities(_req, call)
      raise Flowctl::PermissionDenied.new("not you", metadata: { "x-reason" => "test" }) if call.headers["x-deny"]

      { name: "doubler", max_concurrent: 2 }
    end
  end

  it "serves the embedded control plane to the control plane client: all six RPCs" do
    registry = Flowctl::ControlPlane::Registry.new(ttl: 5)
    cp = client(Flowctl::ControlPlane::Client, start(Flowctl::ControlPlane::Service => registry))
    pid = cp.register_processor(endpoint: "127.0.0.1:7000", metadata: { "k" => "v" }).processor_id
    expect(pid).to match(/\Aprocessor-\h{8}\z/)
    expect(cp.register_source(source_id: "s1").source_id).to eq("s1")
    expect(cp.register_consumer(consumer_id: "c1").success).to be(true)
    now = Time.now
    expect(cp.processor_heartbeat(processor_id: pid, status: "HEALTHY", timestamp: now, metrics: { "eps" => 42.5 }).success)
      .to be(true)
    expect(cp.source_heartbeat(source_id: "s1", status: "STARTING").success).to be(true)
    unknown = cp.consumer_heartbeat(consumer_id: "ghost")
    expect([unknown.success, unknown.message]).to eq([false, 'unknown consumer "ghost": not registered with this control plane, register first'])
    p = registry.component(:processor, pid)
    expect([p.endpoint, p.metadata, p.status, p.metrics]).to eq(["127.0.0.1:7000", { "k" => "v" }, "HEALTHY", { "eps" => 42.5 }])
    expect(p.reported_at.to_r).to eq(now.to_r.round(9))
    expect(registry.components.map(&:kind)).to eq(%i[processor source consumer])
  end

  it "streams with process { |reply| } and with process_stream (write, read, close_write)" do
    server = start(Flowctl::Processor::Service => Doubler.new)
    pc = client(Flowctl::Processor::Client, server)
    out = []
    pc.process([msg("a", "i" => "1"), msg("b")]) { |r| out << r }
    expect(out.map(&:payload)).to eq(%w[aa bb])
    expect(out.first.metadata["i"]).to eq("1")
    expect(out.first.metadata["peer"]).to match(/\Aipv4:127\.0\.0\.1:/)

    call = pc.process_stream
    call << msg("x")
    expect(call.read.payload).to eq("xx") # the reply comes before the client closes its side
    call.write(payload: "y")
    expect(call.read.payload).to eq("yy")
    call.close_write
    expect(call.read).to be_nil
    expect(call.status).to eq(0)
  end

  it "delivers handler statuses with details and trailing metadata" do
    pc = client(Flowctl::Processor::Client, start(Flowctl::Processor::Service => Doubler.new))
    expect(pc.get_capabilities.name).to eq("doubler")
    expect { pc.get_capabilities(headers: { "x-deny" => "1" }) }.to raise_error(Flowctl::PermissionDenied) { |e|
      expect(e.details).to eq("not you")
      expect(e.metadata["x-reason"]).to eq("test")
    }
  end

  it "gives the handler the client's deadline, and the client DEADLINE_EXCEEDED when it passes" do
    seen = Queue.new
    handler = Object.new
    handler.define_singleton_method(:get_capabilities) do |_r, call|
      seen << call.deadline
      sleep 0.5
      {}
    end
    pc = client(Flowctl::Processor::Client, start(Flowctl::Processor::Service => handler))
    t0 = Time.now
    expect { pc.get_capabilities(timeout: 0.2) }.to raise_error(Flowctl::DeadlineExceeded)
    expect(seen.pop).to be_within(0.1).of(t0 + 0.2)
  end

  it "lets the handler see the client's cancel as Flowctl::Cancelled" do
    seen = Queue.new
    handler = Object.new
    handler.define_singleton_method(:process) do |requests, _call, &out|
      requests.each { |m| out.call(m) }
      seen << :ended
    rescue Flowctl::Cancelled => e
      seen << e.class
      raise
    end
    server = start({ Flowctl::Processor::Service => handler }, pool_size: 1)
    pc = client(Flowctl::Processor::Client, server)
    call = pc.process_stream
    call << msg("1")
    expect(call.read.payload).to eq("1")
    call.cancel
    expect(seen.pop).to eq(Flowctl::Cancelled)
    # its only worker is free again
    expect(pc.process([msg("2")]).map(&:payload)).to eq(["2"])
  end

  it "talks mTLS and checks the bearer token" do
    tls = Flowctl::TLS.new(cert_chain: pem("server.pem"), private_key: pem("server.key"), root_certs: pem("ca.pem"),
                           client_auth: :require)
    server = start({ Flowctl::Processor::Service => Doubler.new }, tls: tls, auth_token: "tok")
    client_tls = Flowctl::TLS.new(root_certs: pem("ca.pem"), cert_chain: pem("client.pem"), private_key: pem("client.key"))
    args = { channel_args: { "grpc.ssl_target_name_override" => "localhost" } }
    good = client(Flowctl::Processor::Client, server, tls: client_tls, headers: { "authorization" => "Bearer tok" }, **args)
    expect(good.get_capabilities.name).to eq("doubler")
    expect(good.process([msg("z")]).map(&:payload)).to eq(["zz"])
    no_token = client(Flowctl::Processor::Client, server, tls: client_tls, **args)
    expect { no_token.get_capabilities }.to raise_error(Flowctl::Unauthenticated)
    no_cert = client(Flowctl::Processor::Client, server, tls: Flowctl::TLS.new(root_certs: pem("ca.pem")),
                                                         headers: { "authorization" => "Bearer tok" }, **args)
    expect { no_cert.get_capabilities(timeout: 2) }.to raise_error(Flowctl::Unavailable)
  end

  it "keeps serving many calls from several client threads with no leaked worker" do
    server = start({ Flowctl::Processor::Service => Doubler.new }, pool_size: 4)
    pc = client(Flowctl::Processor::Client, server)
    results = 4.times.map do |t|
      Thread.new { 50.times.map { |i| pc.process([msg("#{t}-#{i}")]).map(&:payload).first } }
    end.map(&:value)
    expect(results.flatten.size).to eq(200)
    expect(results[2][7]).to eq("2-72-7")
    deadline = Time.now + 5
    sleep 0.01 until server.stats[:idle] == 4 || Time.now > deadline
    expect(server.stats).to include(idle: 4, queued: 0)
  end

  # Writes are queued (pump.c): a message written while the send before it is still in
  # flight must not wait for the program's next move on the stream.
  describe "messages written with nothing else happening on the stream" do
    def clock = Process.clock_gettime(Process::CLOCK_MONOTONIC)

    it "a server pushing a reply now and then: each reaches the client at once" do
      pusher = Class.new do
        def process(requests, call)
          requests.first # the client's hello
          4.times do |i|
            call.write(payload: "push#{i}")
            sleep 0.3 # the handler does other work, leaving the stream alone
          end
        end
      end
      pc = client(Flowctl::Processor::Client, start(Flowctl::Processor::Service => pusher.new))
      t0 = clock
      arrivals = pc.process([msg("hello")]).map { |r| [r.payload, clock - t0] }
      expect(arrivals.map(&:first)).to eq(%w[push0 push1 push2 push3])
      arrivals.each_with_index do |(payload, at), i|
        expect(at).to be < time_limit(0.3 * i + 0.2), "#{payload} arrived after #{at.round(3)} s"
      end
    end

    it "a client writing twice and then reading later: the server gets both at once" do
      seen = Queue.new
      recorder = Class.new do
        define_method(:process) do |requests, _call|
          requests.each { |m| seen << [m.payload, Process.clock_gettime(Process::CLOCK_MONOTONIC)] }
          [{ payload: "done" }]
        end
      end
      pc = client(Flowctl::Processor::Client, start(Flowctl::Processor::Service => recorder.new))
      call = pc.process_stream
      t0 = clock
      call.write(msg("a"))
      call.write(msg("b"))
      sleep 0.5 # not touching the stream
      got = Timeout.timeout(time_limit(2)) { [seen.pop, seen.pop] }
      call.close_write
      expect(call.read.payload).to eq("done")
      expect(got.map(&:first)).to eq(%w[a b])
      got.each { |payload, at| expect(at - t0).to be < time_limit(0.2), "#{payload} reached the server after #{(at - t0).round(3)} s" }
    end

    # A burst's writes queue behind the send in flight and gRPC holds hinted ones (pump.c):
    # what is held must still leave while the writer goes on to something else.
    it "a server writing a burst, then waiting for the client: the whole burst arrives meanwhile" do
      client_has_all = Queue.new
      limit = time_limit(10)
      burster = Class.new do
        define_method(:process) do |requests, call|
          requests.first
          200.times { |i| call.write(payload: "b#{i}") }
          Timeout.timeout(limit) { client_has_all.pop } # no write, no read, no return until then
          call.write(payload: "end")
        end
      end
      pc = client(Flowctl::Processor::Client, start(Flowctl::Processor::Service => burster.new))
      call = pc.process_stream
      call.write(msg("hello"))
      got = Timeout.timeout(time_limit(5)) { 200.times.map { call.read.payload } }
      client_has_all << true
      call.close_write
      expect(got).to eq(200.times.map { |i| "b#{i}" })
      expect(call.read.payload).to eq("end")
      expect(call.read).to be_nil
    end

    it "a client writing a burst, then leaving the stream alone: the server gets it all meanwhile" do
      seen = Queue.new
      counter = Class.new do
        define_method(:process) do |requests, _call|
          requests.each { |m| seen << m.payload }
          [{ payload: "done" }]
        end
      end
      pc = client(Flowctl::Processor::Client, start(Flowctl::Processor::Service => counter.new))
      call = pc.process_stream
      200.times { |i| call.write(msg("c#{i}")) }
      got = Timeout.timeout(time_limit(5)) { 200.times.map { seen.pop } } # the client is not touching the stream
      expect(got).to eq(200.times.map { |i| "c#{i}" })
      call.close_write
      expect(call.read.payload).to eq("done")
    end
  end
end
