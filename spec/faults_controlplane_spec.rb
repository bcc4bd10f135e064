# frozen_string_literal: true

require "spec_helper"
require "json"
require "rbconfig"

# The gem's embedded control plane (Flowctl::Server + ControlPlane::Registry) in its own
# process, killed with SIGKILL and started again (empty) ten times on the same port while
# three native heartbeats (processor, source, consumer) run in this process: nothing
# crashes, and after every restart every component is registered again within two
# heartbeat intervals of the new control plane answering.
RSpec.describe "faults: the control plane killed and restarted while heartbeats run" do
  INTERVAL = 1.0
  RESTARTS = 10

  CP_SCRIPT = <<~'RUBY'
    $LOAD_PATH.unshift ARGV[0]
    require "flowctl"
    require "json"
    $stdout.sync = true
    registry = Flowctl::ControlPlane::Registry.new(ttl: 30)
    server = Flowctl::Server.new(host: "127.0.0.1", port: Integer(ARGV[1]), tls: false)
    server.handle(Flowctl::ControlPlane::Service, registry)
    puts "PORT #{server.start}"
    while (line = $stdin.gets)
      next unless line.strip == "list"

      puts "LIST " + JSON.generate(registry.components.map { |c| [c.kind.to_s, c.id, c.heartbeats] })
    end
  RUBY

  class KillableControlPlane
    attr_reader :port

    def start(port = 0)
      @io = IO.popen([RbConfig.ruby, "-e", CP_SCRIPT, File.expand_path("../lib", __dir__), port.to_s], "r+")
      line = @io.gets or raise "control plane process died"
      @port = Integer(line[/\APORT (\d+)/, 1])
      @started_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      self
    end

    attr_reader :started_at

    def components
      @io.puts("list")
      JSON.parse(@io.gets.to_s.delete_prefix("LIST "))
    end

    def kill
      Process.kill(:KILL, @io.pid)
      Process.wait(@io.pid)
      @io.close
    rescue Errno::ESRCH, Errno::ECHILD, IOError
      nil
    end
  end

  def registered_all?(cp, ids)
    have = cp.components.map { |kind, id, beats| [kind, id] if beats.to_i >= 1 }.compact
    ids.all? { |pair| have.include?(pair) }
  end

  it "re-registers every component within two intervals after each of ten restarts" do
    cp = KillableControlPlane.new.start
    port = cp.port
    client = Flowctl::ControlPlane::Client.new("127.0.0.1:#{port}", tls: false) # default reconnect backoff
    ids = %w[processor source consumer].map { |k| [k, "#{k}-faults"] }
    beats = ids.map do |kind, id|
      client.start_heartbeat(kind.to_sym, id: id, interval: INTERVAL, register: {endpoint: "127.0.0.1:1", metadata: {"k" => "v"}})
    end
    delays = []
    deadline = ->(t0) { Process.clock_gettime(Process::CLOCK_MONOTONIC) - t0 }
    sleep 0.05 until registered_all?(cp, ids) || deadline.call(cp.started_at) > 5
    expect(registered_all?(cp, ids)).to be(true)

    RESTARTS.times do
      cp.kill
      sleep INTERVAL * 1.5 # beats fail meanwhile
      cp = KillableControlPlane.new.start(port)
      sleep 0.02 until registered_all?(cp, ids) || deadline.call(cp.started_at) > 10
      delays << deadline.call(cp.started_at)
    end
    expect(delays.size).to eq(RESTARTS)
    expect(delays.max).to be <= 2 * INTERVAL, "seconds to re-register after each restart: #{delays.map { |d| d.round(2) }}"
    beats.each do |hb|
      expect(hb.stats[:registrations]).to be >= RESTARTS + 1
      expect(hb.stats[:failed]).to be >= 1
    end
    puts "\n      control plane restarts survived: #{RESTARTS}; re-registered after #{delays.map { |d| d.round(2) }} s"
  ensure
    beats&.each { |hb| hb.stop(0.5) }
    client&.close
    cp&.kill
  end
end
