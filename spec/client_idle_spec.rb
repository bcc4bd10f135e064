# frozen_string_literal: true

require "spec_helper"
require "rbconfig"
require "socket"
require "stringio"
require "tmpdir"

# Everyday defects of an idle client and of first use (issue 16): connections polled with no
# call in flight (gRPC's backup poller every 10 ms, channel.c), one GVL hand-off on an interrupt, the messages a new user meets.
RSpec.describe "Flowctl clients in everyday use" do
  let(:servers) { [] }
  let(:clients) { [] }

  after do
    clients.each(&:close)
    servers.each { |s| s.stop(grace: 0.2) }
  end

  def now = Process.clock_gettime(Process::CLOCK_MONOTONIC)

  def start_server(port: 0)
    server = Flowctl::Server.new(port: port, tls: false)
    server.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
    server.start
    servers << server
    server
  end

  def client(port, **opts)
    c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false, **opts)
    clients << c
    c
  end

  # The control plane in a child process (`ruby -e`): loaded at once, listening on port once
  # told to (#listen), killed with SIGKILL.
  def spawn_control_plane(port)
    script = <<~RUBY
      require "flowctl"
      s = Flowctl::Server.new(port: #{port}, tls: false)
      s.handle(Flowctl::ControlPlane::Service, Flowctl::ControlPlane::Registry.new)
      puts "loaded"
      $stdout.flush
      $stdin.gets
      s.start
      puts "up"
      $stdout.flush
      sleep
    RUBY
    io = IO.popen([RbConfig.ruby, "-I", FLOWCTL_LIB, "-e", script], "r+")
    expect(io.gets).to eq("loaded\n")
    io
  end

  def listen(io)
    io.puts "listen"
    io.flush
    expect(io.gets).to eq("up\n")
  end

  def kill(io)
    Process.kill(:KILL, io.pid)
    Process.wait(io.pid)
    io.close
  end

  describe "an idle channel (no call in flight)" do
    it "connects at once when asked to (channel.state(true)), not at gRPC's 5 s backup poll" do
      c = client(start_server.port)
      t0 = now
      sleep 0.01 until c.channel.state(true) == :ready || now - t0 > 6
      expect(c.channel.state).to eq(:ready)
      expect(now - t0).to be < time_limit(2.0)
    end

    it "lets a stopping server go before its grace period ends (the client reads the GOAWAY and closes)" do
      server = start_server
      c = client(server.port, timeout: time_limit(5)) # (an in-process server under GC.stress takes seconds)
      c.register_processor(processor_id: "idle")
      sleep 0.3 # idle: no call in flight
      t0 = now
      server.stop(grace: 4)
      expect(now - t0).to be < time_limit(2.0)
    end

    # A server killed right after a call and replaced 50 ms later (on the same port): the next
    # call reaches the new server. Only a thread waiting on a call polls a connection in gRPC
    # core, and between two calls nobody did: until the next call wrote on the dead connection
    # and failed UNAVAILABLE ("Socket closed", "Broken pipe", "Connection reset by peer"). The
    # servers are loaded beforehand so that the time between the death and the call is this
    # example's, not Ruby's start-up time (restarts taking 0.1-0.25 s failed in CI, 0.5 s passed:
    # the old watcher of idle channels looked again after 100 ms without a call).
    it "sees its connection die between calls: its first call after its server was replaced succeeds" do
      port = TCPServer.open("127.0.0.1", 0) { |s| s.addr[1] }
      ios = Array.new(4) { spawn_control_plane(port) }
      listen(ios[0])
      c = client(port, timeout: 5)
      errors = []
      3.times do |i|
        c.register_processor(processor_id: "before")
        kill(ios[i])
        listen(ios[i + 1])
        sleep 0.05
        c.register_processor(processor_id: "after")
      rescue Flowctl::Unavailable => e
        errors << e.message
      end
      expect(errors).to eq([])
    ensure
      ios&.each { |io| kill(io) unless io.closed? }
    end
  end

  it "cancels an interrupted call without a second GVL hand-off, while another thread keeps the CPU busy" do
    silent = TCPServer.new("127.0.0.1", 0) # accepts and never answers: calls block
    accepted = []
    acceptor = Thread.new { loop { accepted << silent.accept } }
    c = client(silent.addr[1], timeout: 30)
    busy = Thread.new { x = 0; loop { x += 1 } }
    before = Flowctl::Native.spin_stats.fetch(:cancel_waits)
    (ENV["GC_STRESS"] == "1" ? 1 : 3).times do # (a busy thread against GC.stress: every switch is slow)
      t = Thread.new do
        Thread.current.report_on_exception = false
        c.register_processor(processor_id: "x")
      end
      sleep 0.2 until t.status == "sleep" || !t.alive?
      sleep 0.1
      t0 = now
      t.raise(IOError, "enough")
      expect { t.join }.to raise_error(IOError, "enough")
      expect(now - t0).to be < time_limit(1.0)
    end
    # the cancelled batch was taken with the GVL held, not after giving it away again
    expect(Flowctl::Native.spin_stats[:cancel_waits]).to eq(before)
  ensure
    busy&.kill
    acceptor&.kill
    accepted&.each(&:close)
    silent&.close
  end

  it "says what to run when the C extension is not built (a Bundler path: checkout)" do
    Dir.mktmpdir do |dir|
      FileUtils.cp_r(FLOWCTL_LIB, dir)
      Dir[File.join(dir, "lib", "flowctl", "flowctl.{so,bundle}")].each { |f| File.delete(f) }
      out = IO.popen([RbConfig.ruby, "-I", File.join(dir, "lib"), "-e",
                      'begin; require "flowctl"; rescue LoadError => e; print e.message; end'], &:read)
      expect(out).to include("C extension", "is not built", "rake compile", "libgrpc-dev")
    end
  end

  describe "TLS against a plaintext server" do
    it "says the server may be plaintext, and prints nothing of gRPC's own on stderr" do
      server = start_server
      script = <<~RUBY
        require "flowctl"
        c = Flowctl::ControlPlane::Client.new("127.0.0.1:#{server.port}", timeout: 2)
        begin
          c.register_processor(processor_id: "x")
        rescue Flowctl::Unavailable => e
          puts e.message
        end
      RUBY
      out = err = nil
      IO.pipe do |r, w|
        out = IO.popen({ "GRPC_VERBOSITY" => nil }, [RbConfig.ruby, "-I", FLOWCTL_LIB, "-e", script], err: w, &:read)
        w.close
        err = r.read
      end
      expect(out).to include("the server may be plaintext", "tls: false")
      expect(err).to eq("")
    end
  end

  it "names an unknown per-call keyword given with a request object" do
    c = client(1)
    req = Flowctl::ControlPlane::RegisterProcessorRequest.new(processor_id: "p")
    expect { c.register_processor(req, wait_for_ready: true) }
      .to raise_error(ArgumentError, /unknown keyword\(s\) :wait_for_ready: the per-call options are timeout: and headers:/)
    expect { c.register_processor(processor_id: "p", wait_for_ready: true) }
      .to raise_error(ArgumentError, /unknown field :wait_for_ready/)
  end

  describe "Flowctl.logger" do
    after { Flowctl.logger = nil }

    it "receives gRPC core's lines at the logger's level, from a thread of its own" do
      io = StringIO.new
      Flowctl.logger = Logger.new(io, level: :info)
      Flowctl::Native.log_test(1, "an info line")
      Flowctl::Native.log_test(0, "a debug line")
      Flowctl::Native.log_test(2, "an error line")
      t0 = now
      sleep 0.01 until io.string.include?("an error line") || now - t0 > time_limit(2)
      expect(io.string).to match(/INFO -- grpc: log\.c:\d+\] an info line/)
      expect(io.string).to match(/ERROR -- grpc: log\.c:\d+\] an error line/)
      expect(io.string).not_to include("a debug line")
      expect(Thread.list.map(&:name)).to include("flowctl-log")
    end

    it "refuses what is not a Logger" do
      expect { Flowctl.logger = $stderr }.to raise_error(TypeError, /Flowctl.logger must be a Logger/)
    end
  end
end
