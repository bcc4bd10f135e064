# frozen_string_literal: true

module Flowctl
  # The standard gRPC health service (grpc.health.v1.Health: Check and Watch) for any
  # Flowctl::Server, so that grpc_health_probe, Kubernetes gRPC probes and the official
  # gems' health stubs can check it.
  #
  #   health = Flowctl::Health.new                       # "" (the whole server): SERVING
  #   server.handle(Flowctl::Health::SERVICE, health)
  #   health.set("flowctl.v1.ProcessorService", :SERVING)
  #   health.set("", :NOT_SERVING)                       # draining
  #
  # Check of a service never set answers NOT_FOUND (as gRPC's own health servers do);
  # Watch sends the status at once and then every change, and SERVICE_UNKNOWN for a
  # service never set, until the client goes away or #shutdown.
  class Health
    SERVICE = Grpc::Health::V1::Health
    Response = Grpc::Health::V1::HealthCheckResponse
    STATUSES = Response::ServingStatus.values.keys.freeze
    # how often a Watch looks whether its client is still there
    WATCH_POLL = 0.5

    def initialize(status = :SERVING)
      @lock = Mutex.new
      @changed = ConditionVariable.new
      @statuses = {}
      @version = 0
      @shutdown = false
      set("", status)
    end

    # Sets the status of a service ("" for the server as a whole): :SERVING, :NOT_SERVING
    # (or :UNKNOWN); watchers are told at once.
    def set(service = "", status)
      raise TypeError, "service must be a String (given #{service.class})" unless service.is_a?(String)

      status = status.to_sym if status.is_a?(String)
      unless STATUSES.include?(status) && status != :SERVICE_UNKNOWN
        raise ArgumentError, "health status must be one of :SERVING, :NOT_SERVING, :UNKNOWN (given #{status.inspect})"
      end

      @lock.synchronize do
        @statuses[service.dup.freeze] = status
        @version += 1
        @changed.broadcast
      end
      self
    end

    # The status of a service, or nil when it was never set.
    def status(service = "") = @lock.synchronize { @statuses[service] }

    # Every service set: everything NOT_SERVING, and every Watch ends (as gRPC's health
    # servers do when the server goes down).
    def shutdown
      @lock.synchronize do
        @statuses.transform_values! { :NOT_SERVING }
        @shutdown = true
        @version += 1
        @changed.broadcast
      end
      self
    end

    # grpc.health.v1.Health/Check
    def check(request, _call)
      st = status(request.service)
      raise NotFound, "unknown service #{request.service.inspect}" unless st

      Response.new(status: st)
    end

    # grpc.health.v1.Health/Watch (server streaming): the current status, then each change.
    def watch(request, call)
      seen = nil
      version = -1
      loop do
        st, version, state = next_change(request.service, version, call)
        return if state == :gone

        st ||= :SERVICE_UNKNOWN
        call.write(Response.new(status: st)) unless st == seen
        seen = st
        return if state == :shutdown
      end
    end

    private

    # Waits until the version moves past `version`: [status, version, :changed or :shutdown],
    # or [nil, version, :gone] once the client has left.
    def next_change(service, version, call)
      @lock.synchronize do
        while @version == version && !@shutdown
          return [nil, version, :gone] if call.cancelled?

          @changed.wait(@lock, WATCH_POLL)
        end
        [@statuses[service], @version, @shutdown ? :shutdown : :changed]
      end
    end
  end
end
